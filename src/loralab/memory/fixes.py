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


def largest_fitting(lo: int, hi: int, fits) -> int | None:
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
    """The changes that bring the estimate under gpu_gb, each with its new estimate: the single
    changes that fit alone, cheapest first; if none does, one combination ("all of: ...") that
    fits. [] when the run fits already, or when nothing within reach fits (format_estimate then
    names the term that dominates and the memory the run needs as configured). A change that does
    not fit is never offered. estimator: the per-GPU estimate (memory.sharding.estimate_per_gpu)
    when settings hold gpus and fsdp: then sharding over the same GPUs, and the fewest GPUs that
    fit with FSDP, are options too."""
    limit = gpu_bytes(gpu_gb)
    estimator = estimator or estimate
    peak = lambda **kw: estimator(model_config, **{**settings, **kw})["peak_bytes"]  # noqa: E731
    if peak() <= limit:
        return []
    s = {"method": "lora", "batch": 1, "seq": 512, "grad_checkpointing": False, "optimizer": "adamw",
         "grad_accum": 1, "r": 8, **settings}
    levers = _levers(s, lambda base, **kw: peak(**{**base, **kw}), limit)
    singles = [(what, ch) for what, ch, fits, _ in filter(None, (lever({}) for lever in levers)) if fits]
    if singles:
        return [{"change": what, "settings": ch, "peak_bytes": peak(**ch), "fits": True} for what, ch in singles]
    combined, whats = {}, []
    for lever in levers:  # cheapest first; a change that does not fit yet is kept only if it costs no
        found = lever(combined)  # quality and lowers the peak (a toggle, micro batch 1)
        if found is None:
            continue
        what, ch, fits, free = found
        if fits or (free and peak(**combined, **ch) < peak(**combined)):
            combined.update(ch)
            whats.append(what.split(" (")[0])
        if fits:
            return [{"change": "all of: " + "; ".join(whats), "settings": combined, "peak_bytes": peak(**combined),
                     "fits": True}]
    return []


def _levers(s: dict, peak, limit: float) -> list:
    """The changes a user can make, cheapest (no quality cost, least slowdown) first, each a function
    of the changes already made (`base`) -> (what, settings, fits, free) or None when it has nothing to
    offer; free: worth making in a combination even when it does not fit alone (no quality cost)."""
    def toggle(what: str, ch: dict):
        return lambda base: (what, ch, peak(base, **ch) <= limit, True)

    def searched(key: str, floor: int, fmt):  # the largest value below the current one that fits
        def lever(base):
            n = largest_fitting(floor, s[key] - 1, lambda n: peak(base, **{key: n}) <= limit)
            return None if n is None else (fmt(n), {key: n}, True, False)
        return lever if s[key] > floor else None

    levers = []
    if s["batch"] > 1:
        def smaller(n):
            return {"batch": n, "grad_accum": s["grad_accum"] * math.ceil(s["batch"] / n)}

        def batch_lever(base):
            b = largest_fitting(1, s["batch"] - 1, lambda n: peak(base, **smaller(n)) <= limit)
            what = (f"micro batch {s['batch']} -> {b or 1} (gradient accumulation "
                    f"x{math.ceil(s['batch'] / (b or 1))} keeps the batch)")
            return what, smaller(b or 1), b is not None, True
        levers.append(batch_lever)
    gpus = s.get("gpus", 1)
    if gpus > 1 and s.get("fsdp") is False:
        levers.append(toggle(f"FSDP over the same {gpus} GPUs (--fsdp: weights, gradients and optimizer state "
                             "sharded; more communication)", {"fsdp": True}))
    if not s["grad_checkpointing"]:
        levers.append(toggle("gradient checkpointing (recomputes activations: ~30% more compute)",
                             {"grad_checkpointing": True}))
    if s["method"] == "full":
        if s["optimizer"] == "adamw":
            levers.append(toggle("8-bit AdamW (optimizer state 8 -> 2 bytes per parameter)",
                                 {"optimizer": "adamw8bit"}))
        levers.append(toggle("LoRA instead of full fine-tuning", {"method": "lora"}))
    elif s["method"] == "lora":
        levers.append(toggle("QLoRA: NF4 base weights (slower steps, small quality cost)", {"method": "qlora"}))
    elif "gpus" in s:  # QLoRA over GPUs: FSDP shards 16-bit frozen weights, never NF4 ones (sharding.py)
        levers.append(toggle("LoRA on a bf16 base instead of QLoRA (FSDP shards bf16 weights; the NF4 base "
                             "is whole on every GPU)", {"method": "lora", "fsdp": True}))
    if "gpus" in s and gpus < MAX_GPUS:
        def more_gpus(base):
            if gpus > 1 and peak(base, fsdp=True) <= limit:  # sharding the GPUs at hand is enough
                return None
            n = _smallest_fitting(gpus + 1, MAX_GPUS, lambda n: peak(base, gpus=n, fsdp=True) <= limit)
            return None if n is None else (f"{n} GPUs with --fsdp (more hardware; each holds 1/{n} of the "
                                           "sharded weights and state)", {"gpus": n, "fsdp": True}, True, False)
        levers.append(more_gpus)
    # Last: quality costs. A sequence is cut to no less than 1/16 of its length (shorter is no fix).
    levers.append(searched("seq", max(1, s["seq"] // 16),
                           lambda n: f"shorter sequences {s['seq']} -> {n} tokens (longer examples are truncated)"))
    if s["method"] != "full":
        levers.append(searched("r", 1, lambda n: f"lower rank r {s['r']} -> {n} (may cost quality)"))
    return [lever for lever in levers if lever is not None]


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
        if spare < 0:
            lines.append(f"    {over_line(result)}")
            if not fixes:
                lines.append("    no change of micro batch, sharding, GPU count, checkpointing, method, sequence "
                             f"length (to 1/16) or rank fits in {gpu_gb:g} GiB")
        for f in fixes or []:
            lines.append(f"    - {f['change']}: {f['peak_bytes'] / 2**30:.2f} GiB (fits)")
    return "\n".join(lines)


def over_line(result: dict) -> str:
    """Why a run does not fit: the largest term of its peak, what makes it that large, and the
    memory the run needs as configured (whole GiB, as cards are sold)."""
    parts = result["breakdown"]
    key = max(parts, key=parts.get)
    s, shard = result["settings"], result.get("sharding") or {}
    each = " on every GPU" if shard else ""
    why = {"activations": f"seq {s['seq']} x micro batch {s['batch']}"
                          + ("" if s["grad_checkpointing"] else ", without gradient checkpointing"),
           "optimizer_state": f"{s['optimizer']} state of {result['params']['trainable']:,} trainable parameters",
           "communication": "the FSDP units gathered at once" if shard.get("strategy") == "fsdp"
                            else "DDP's gradient buckets"}.get(key, "")
    if key == "frozen_weights":
        if s["method"] == "qlora" and shard.get("strategy") == "fsdp":
            why = "QLoRA's NF4 base is whole on every GPU: FSDP shards 16-bit weights, not NF4 ones"
        elif shard.get("strategy") == "ddp":
            why = "DDP keeps a whole copy of the base on every GPU"
        else:
            why = f"the {s['method']} base model's weights"
    need = math.ceil(result["peak_bytes"] / 2**30)
    return (f"largest term: {key.replace('_', ' ')} {parts[key] / 2**30:.2f} GiB{each}"
            + (f" ({why})" if why else "") + f"; as configured it needs {need} GiB" + (" per GPU" if shard else ""))
