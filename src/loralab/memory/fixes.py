"""What makes a run fit, and the estimate printed: the cheapest changes that bring a run's
estimated peak (estimate.py, or the per-GPU one of sharding.py) under a device's memory."""
from __future__ import annotations

import math

from .estimate import GB, estimate

# ---------------------------------------------------------------------------------------------
# Making it fit

def gpu_bytes(gpu_gb: float) -> float:
    """A GPU's memory as printed on the card: GPU makers' "GB" are GiB (a 24 GB card holds 24 x 2^30)."""
    return gpu_gb * 2**30


def _largest_fitting(lo: int, hi: int, fits) -> int | None:
    """The largest n in [lo, hi] with fits(n), assuming fits is monotone (smaller always fits better)."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


MAX_GPUS = 512  # the most GPUs a fix may propose


def _smallest_fitting(lo: int, hi: int, fits) -> int | None:
    """The smallest n in [lo, hi] with fits(n), assuming fits is monotone (larger always fits better)."""
    if not fits(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def suggest_fixes(model_config: dict, gpu_gb: float, estimator=None, **settings) -> list[dict]:
    """If the estimate exceeds gpu_gb, the cheapest single changes that make it fit, cheapest first
    (each with its new estimate); if none fits alone, them combined in that order. [] if it fits.
    estimator: the per-GPU estimate (memory.sharding.estimate_per_gpu) when settings hold gpus and
    fsdp: then sharding over the same GPUs, and the fewest GPUs that fit with FSDP, are options too."""
    limit = gpu_bytes(gpu_gb)
    estimator = estimator or estimate
    peak = lambda **kw: estimator(model_config, **{**settings, **kw})["peak_bytes"]
    if peak() <= limit:
        return []
    s = {"method": "lora", "batch": 1, "seq": 512, "grad_checkpointing": False, "optimizer": "adamw",
         "grad_accum": 1, **settings}
    options = []  # (what, changes): cheapest (no quality cost, least slowdown) first
    if s["batch"] > 1:
        smaller = lambda n: {"batch": n, "grad_accum": s["grad_accum"] * math.ceil(s["batch"] / n)}  # noqa: E731
        b = _largest_fitting(1, s["batch"] - 1, lambda n: peak(**smaller(n)) <= limit) or 1
        options.append((f"micro batch {s['batch']} -> {b} (gradient accumulation x{math.ceil(s['batch'] / b)} "
                        "keeps the batch)", smaller(b)))
    if s.get("gpus", 1) > 1 and s.get("fsdp") is False:
        options.append((f"FSDP over the same {s['gpus']} GPUs (--fsdp: weights, gradients and optimizer state "
                        "sharded; more communication)", {"fsdp": True}))
    if not s["grad_checkpointing"]:
        options.append(("gradient checkpointing (recomputes activations: ~30% more compute)",
                        {"grad_checkpointing": True}))
    sharding_fits = s.get("gpus", 1) > 1 and peak(fsdp=True) <= limit
    if "gpus" in s and s["gpus"] < MAX_GPUS and not sharding_fits:  # else sharding the GPUs at hand is enough
        n = _smallest_fitting(s["gpus"] + 1, MAX_GPUS, lambda n: peak(gpus=n, fsdp=True) <= limit)
        if n is not None:
            options.append((f"{n} GPUs with --fsdp (more hardware; each holds 1/{n} of the weights and state)",
                            {"gpus": n, "fsdp": True}))
    if s["method"] == "full":
        if s["optimizer"] == "adamw":
            options.append(("8-bit AdamW (optimizer state 8 -> 2 bytes per parameter)", {"optimizer": "adamw8bit"}))
        options.append(("LoRA instead of full fine-tuning", {"method": "lora"}))
    elif s["method"] == "lora":
        options.append(("QLoRA: NF4 base weights (slower steps, small quality cost)", {"method": "qlora"}))
    if s["seq"] > 1:
        n = _largest_fitting(1, s["seq"] - 1, lambda n: peak(seq=n) <= limit) or 1
        options.append((f"shorter sequences {s['seq']} -> {n} tokens (longer examples are truncated)", {"seq": n}))
    if s["method"] != "full" and s.get("r", 8) > 1:  # last: fewer trainable parameters may cost quality
        n = _largest_fitting(1, s.get("r", 8) - 1, lambda n: peak(r=n) <= limit) or 1
        options.append((f"lower rank r {s.get('r', 8)} -> {n} (may cost quality)", {"r": n}))
    out = [{"change": what, "settings": ch, "peak_bytes": peak(**ch), "fits": peak(**ch) <= limit}
           for what, ch in options]
    fitting = [f for f in out if f["fits"]]
    if fitting:
        return fitting
    combined, whats = {}, []
    for what, ch in options:
        key = next((k for k in ("seq", "r") if k in ch), None)
        if key:  # shorten / lower only as much as the other changes leave necessary
            label = {"seq": "shorter sequences", "r": "lower rank r"}[key]
            top = s.get(key, 8)
            n = _largest_fitting(1, top, lambda n, key=key: peak(**{**combined, key: n}) <= limit)
            if n is None or n == top:
                continue
            ch, what = {key: n}, f"{label} {top} -> {n}" + (" tokens" if key == "seq" else "")
        combined.update(ch)
        whats.append(what.split(" (")[0])
        if peak(**combined) <= limit:
            break
    p = peak(**combined)
    return out + [{"change": "all of: " + "; ".join(whats), "settings": combined, "peak_bytes": p, "fits": p <= limit}]


# ---------------------------------------------------------------------------------------------
# Printing

def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_estimate(result: dict, name: str = "", gpu_gb: float | None = None, fixes: list | None = None) -> str:
    s = result["settings"]
    lora = "" if s["method"] == "full" else f" r={s['r']} targets={s['targets']}" + (" DoRA" if s["dora"] else "")
    accum = f" x {s['grad_accum']} accumulated" if s["grad_accum"] > 1 else ""
    lines = [f"loralab estimate: {name} {s['method']}{lora}, seq {s['seq']} x micro batch {s['batch']}{accum}, "
             f"{s['optimizer']}, {s['precision']}{', grad checkpointing' if s['grad_checkpointing'] else ''}, "
             f"{s['device']}" + (f" (malloc: {s['malloc']})" if s.get("malloc") else ""),
             f"  parameters          {result['params']['total']:,} ({result['params']['trainable']:,} trainable)"]
    shard = result.get("sharding")
    if shard:
        how = ("FSDP: weights, gradients, optimizer state sharded" if shard["strategy"] == "fsdp"
               else "DDP: every GPU holds a full copy")
        lines.append(f"  per GPU of {shard['gpus']} ({how}; each its own micro batch)")
    for key, value in result["breakdown"].items():
        lines.append(f"  {key.replace('_', ' '):<18}{_gib(value)}")
    peak = result["peak_bytes"]
    lines.append(f"  {'predicted peak':<18}{_gib(peak)}   ({peak / GB:.2f} GB, at the {result['phase']})")
    if shard:
        lines.append(f"  {'on one GPU':<18}{_gib(shard['single_gpu_peak_bytes'])}")
    if gpu_gb is not None:
        spare = gpu_bytes(gpu_gb) - peak
        lines.append(f"  fits in {gpu_gb:g} GiB: " + (f"yes ({spare / 2**30:.2f} GiB to spare)" if spare >= 0
                                                    else f"no ({-spare / 2**30:.2f} GiB over)"))
        for f in fixes or []:
            mark = "fits" if f["fits"] else "still over"
            lines.append(f"    - {f['change']}: {f['peak_bytes'] / 2**30:.2f} GiB ({mark})")
    return "\n".join(lines)
