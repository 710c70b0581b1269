"""Paired A/B of training-step levers inside one process: the same packed micro batches, the
variants interleaved step by step, so slow drifts of a shared machine hit every variant alike.

    .venv/bin/python benchmarks/experiments/levers_ab.py [--rounds 6] [--batch 8] [--variants stock,chunk256,sdpa]
        [--workload throughput|demo] [--precision auto|bf16|fp32]

--workload demo steps the demo's micro batches (configs/demo.yaml's 2-digit addition / subtraction
questions, ~20 tokens each; use --batch 16 for the demo's micro batch) instead of the throughput
benchmark's mix of short and long examples, with the demo's LoRA (rank 16, no dropout, the layers
`make demo` trains; else the throughput benchmark's, with dropout 0.05). --precision fp32 forces the
path of CPUs without bf16.

Variants (switchable at run time on one loaded model; combine with '+', e.g. chunk256+sdpa):
  stock     loralab as it is (eager attention on the CPU, head chunks of 1024 labelled rows)
  chunk256  the output layer in chunks of 256 labelled rows (logits recomputed in backward)
  sdpa      torch's scaled_dot_product_attention for every micro batch (stock: `auto`, by row length)
  recompute eager attention with its core recomputed in backward for every micro batch
  trimheap  the loop's heap trims in forward (train.trim_heap=true, loralab.train.heap). The heap a
            variant leaves is the next one's, and this A/B understates the trims' cost (+2% here, 13%
            in the loop, throughput.py --sides packed,packed+trim): use the loop's numbers
  trim      glibc malloc_trim(0) before every decoder block's forward and backward (instead of the
            loop's trims before every 10th block in forward only)
  plaindrop LoRA's dropout as the plain composition (dropout module, then A and B): a float mask
            and the dropped input kept per layer, what peft/dropout.low_rank's bool mask replaced
            (implies unfused: the fused layer draws its own bool mask)
  wheremask the fused layer's dropout mask made by torch.where over the bool mask (the same values), as it
            was before peft/fused._kept read the mask as bytes
  unfused   each LoRA layer as base layer, then A and B, then an add (autograd's composition),
            what peft/fused.py's one function per layer replaced
  plainmlp  the model's own SwiGLU forward (keeps SiLU's output too), what model/mlp.py replaced
  plainnorm the model's own RMSNorm forward (keeps an fp32 copy of its input), what model/norm.py replaced
  keepnorm  the norms' outputs kept for their readers' backward, what model/rebuild.py rebuilds instead
  noprefix  the same examples without a shared prefix (train.shared_prefix=false): every row runs the
            first tokens all examples share, what loralab.model.shared_prefix spares
  rowsN     shared-prefix rows of at least N tokens instead of data.layout.SHARED_ROW_TOKENS (e.g. rows128)
  qlora     a second model with NF4 frozen weights (model.quant=nf4), stepped on the same batches
            (alone, not combined; its peak RSS includes the other model's weights, ~0.3 GB)
  qlora_torch, qlora_torchao  the same, dequantizing with loralab's torch gather (what runs without
            bitsandbytes) or with torchao's own code (what ran before: the QLoRA speed-up's before)
Each step: forward + backward of one micro batch (no optimizer: it is the same for all), timed,
and its peak RSS (loralab.memory.measure.PeakMemory, reset before each step). Reports per variant the
median step time, its median ratio to `stock` over the rounds (paired), and the median peak.
Respects /tmp/loralab_cpu_lock.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers


def set_nf4_kernel(model, kernel: str) -> None:
    """Which code dequantizes every NF4Linear of `model` (loralab.peft.quant.KERNELS)."""
    from loralab.peft.quant import KERNELS, NF4Linear

    if kernel not in KERNELS:
        raise SystemExit(f"unknown NF4 kernel {kernel!r}: one of {', '.join(KERNELS)}")
    for m in model.modules():
        if isinstance(m, NF4Linear):
            m.kernel = kernel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="stock,chunk256,sdpa")
    ap.add_argument("--unpacked", action="store_true", help="padded batches instead of packed ones")
    ap.add_argument("--workload", choices=["throughput", "demo"], default="throughput")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch

    import cpu_lock
    from loralab.config import RunConfig, load_config
    from loralab.memory.measure import PeakMemory
    from loralab.model import norm as lean_norm
    from loralab.model.attention import _AUTO_ATTR as AUTO_ATTR
    from loralab.model.attention import RECOMPUTE, register
    from loralab.prepare import setup_model
    from loralab.study.spec import DEMO_CONFIG
    from loralab.train.heap import malloc_trim, trim_heap_in_forward
    from loralab.train.loop import micro_batches
    from loralab.train.loss import CHUNK_ROWS, loss_sum
    from workload import LORA, demo_overrides, encoded_data

    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    if a.workload == "demo":  # the demo's own LoRA (its rank, no dropout, `make demo`'s layers)
        cfg.lora = load_config(DEMO_CONFIG, demo_overrides()).lora
    cfg.train.batch_size, cfg.train.packing, cfg.train.precision = a.batch, not a.unpacked, a.precision
    model, tok, _, info = setup_model(cfg, torch.device("cpu"))
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    models = {"main": model}
    for v in variants:
        if v.startswith("qlora"):
            cfg.model.quant = "nf4"
            models[v] = setup_model(cfg, torch.device("cpu"))[0].train()
            cfg.model.quant = "none"
            set_nf4_kernel(models[v], v.partition("_")[2] or "auto")
    if a.workload == "demo":
        from loralab.data.prompts import encode_all
        from loralab.data.tasks import make_task

        examples = [e for t in ("2da", "2ds") for e in make_task(t, a.rounds * a.batch, 0, 42)[0]]
        enc, _ = encode_all(examples, tok, template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                            max_seq_len=cfg.data.max_seq_len)
    else:
        enc, _ = encoded_data(tok, a.rounds * a.batch, 42)
    # the loop's own micro batches (train.packing and train.shared_prefix decide the layout): `rounds` of them
    import loralab.data.layout as layout

    def loop_batches(shared_prefix=True, row_tokens=layout.SHARED_ROW_TOKENS):
        default, layout.SHARED_ROW_TOKENS = layout.SHARED_ROW_TOKENS, row_tokens
        try:
            stream = micro_batches(enc, dataclasses.replace(cfg.train, shared_prefix=shared_prefix), tok.pad_token_id)
            return [next(stream) for _ in range(a.rounds)]
        finally:
            layout.SHARED_ROW_TOKENS = default

    batches = loop_batches()
    other_batches = {"noprefix": loop_batches(shared_prefix=False)}
    for v in variants:
        other_batches.update({p: loop_batches(row_tokens=int(p[4:])) for p in v.split("+")
                              if p.startswith("rows") and p[4:].isdigit()})
    eager = model.config._attn_implementation
    auto = getattr(model, AUTO_ATTR, False)

    current = {"model": model, "chunk_rows": CHUNK_ROWS, "batches": batches}
    hooks = []

    import torch.nn.functional as F

    import loralab.peft.fused as lora_fused
    import loralab.peft.variants as lora_variants
    from loralab.peft.dropout import scaled_mask

    fused_low_rank = lora_variants.low_rank
    bytes_mask = lora_fused._kept

    def where_mask(keep, x2):  # 0 / 1 in x's dtype, as torch.where over the bool mask makes it
        return scaled_mask(keep.reshape(x2.shape), 0.0, x2.dtype)
    lean = [(m, vars(m)["forward"]) for m in model.modules() if "forward" in vars(m)]
    lean_mlps = [(m, f) for m, f in lean if hasattr(m, "gate_proj")]
    lean_norms = [(m, f) for m, f in lean if hasattr(m, "variance_epsilon")]

    def plain_low_rank(dropout, x, a, b):
        return F.linear(F.linear(dropout(x), a), b)


    def set_variant(v: str):
        if v.startswith("qlora"):
            current["model"] = models[v]
            v = "stock"
        else:
            current["model"] = model
        mods = set(v.split("+")) - {"stock"}
        unknown = mods - {"chunk256", "sdpa", "recompute", "trim", "plaindrop", "plainmlp", "plainnorm", "unfused",
                          "wheremask", "trimheap", "keepnorm"} - set(other_batches)
        if unknown:
            raise SystemExit(f"unknown variant part(s) {sorted(unknown)}")
        current["chunk_rows"] = 256 if "chunk256" in mods else CHUNK_ROWS
        current["batches"] = next((other_batches[m] for m in mods if m in other_batches), batches)
        # unfused: LoRA as base layer + two matmuls + add, autograd's composition (peft/fused.py)
        lora_fused.ENABLED = not {"unfused", "plaindrop"} & mods
        lora_fused._kept = where_mask if "wheremask" in mods else bytes_mask
        lean_norm.REBUILT = "keepnorm" not in mods  # keepnorm: the norms' outputs kept, not rebuilt (model/rebuild.py)
        # plaindrop: LoRA's dropout as the plain autograd composition (float mask and dropped input
        # kept per layer), what peft/dropout.low_rank replaces
        lora_variants.low_rank = plain_low_rank if "plaindrop" in mods else fused_low_rank
        # plainmlp / plainnorm: the model's own MLP (SiLU's output kept) / RMSNorm (an fp32 copy kept) forward
        for part, modules in (("plainmlp", lean_mlps), ("plainnorm", lean_norms)):
            for m, forward in modules:
                if part in mods:
                    vars(m).pop("forward", None)
                else:
                    m.forward = forward
        # a fixed attention must not be switched back by `auto`'s per-batch choice (model/attention.py)
        fixed = "sdpa" if "sdpa" in mods else RECOMPUTE if "recompute" in mods else None
        setattr(model, AUTO_ATTR, auto and fixed is None)
        if fixed == RECOMPUTE:
            register()
        model.set_attn_implementation(fixed or eager)
        while hooks:
            hooks.pop().remove()
        if "trim" in mods:
            from loralab.train.compile import decoder_blocks

            def trim(*args):  # returns None: the hook must not replace the inputs
                malloc_trim()(0)
            for block in decoder_blocks(model):
                hooks.append(block.register_forward_pre_hook(trim))
                hooks.append(block.register_full_backward_pre_hook(trim))
        elif "trimheap" in mods:
            hooks.extend(trim_heap_in_forward(current["model"]))

    model.train()

    # what train.step.accumulate_gradients does for one micro batch, with the output layer's chunk size
    # as a lever (loss_sum takes it; accumulate_gradients does not)
    def step(i):
        m, b = current["model"], current["batches"][i % a.rounds]
        s, n = loss_sum(m, b, chunk_rows=current["chunk_rows"])
        (s / n).backward()
        m.zero_grad(set_to_none=True)

    if not a.no_lock:
        cpu_lock.acquire("levers_ab")
    rows = {v: {"t": [], "peak": []} for v in variants}
    load0 = f"{os.getloadavg()[0]:.2f}"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        for v in variants:  # warm-up: one-time checks, allocator growth
            set_variant(v)
            step(0)
        for r in range(a.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate who goes first
            for v in order:
                set_variant(v)
                with PeakMemory("cpu") as pm:
                    t0 = time.perf_counter()
                    step(r)
                    dt = time.perf_counter() - t0
                rows[v]["t"].append(dt)
                rows[v]["peak"].append(pm.result()["peak_memory_bytes"])
    finally:
        if not a.no_lock:
            cpu_lock.release()
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    shapes = {name: [(int(b.get("shared_prefix", 0)), *b["input_ids"].shape) for b in bs][:3]
              for name, bs in {"stock": batches, **other_batches}.items() if name == "stock" or name in a.variants}
    print(f"{a.rounds} rounds x {len(variants)} variants, {a.workload} workload, {info.precision}, "
          f"{'padded' if a.unpacked else 'packed'} micro batches (shared prefix, rows, width; the first 3) {shapes}; "
          f"{busy:.2f} cores busy; "
          f"load average before {load0}, after {os.getloadavg()[0]:.2f}")
    base = rows.get("stock")
    print(f"{'variant':<22} {'step (median)':>14} {'vs stock (paired)':>18} {'peak RSS (median)':>18}")
    for v, r in rows.items():
        ratio = statistics.median(t / s for t, s in zip(r["t"], base["t"])) if base else float("nan")
        print(f"{v:<22} {statistics.median(r['t']):>12.2f} s {ratio:>17.2f}x "
              f"{statistics.median(r['peak']) / 2**20:>15,.0f} MB")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
