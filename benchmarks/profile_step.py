"""Where a loralab LoRA step spends its time: torch.profiler over one micro batch of the
throughput benchmark's data, ops grouped into matmul / attention softmax / output softmax /
dropout RNG / casts / other elementwise.

    .venv/bin/python benchmarks/profile_step.py [--packed] [--attn eager|sdpa] [--batch 8] [--precision fp32]
                                                [--shapes] [--rows 12]

--shapes splits the op table by input shape (which GEMMs the matmul time is spent in).

Runs on the malloc the `loralab` command preloads (loralab/allocator.py). Respects /tmp/loralab_cpu_lock
(waits, then holds it for the ~1 minute it runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUPS = [  # (group, op-name substrings), first match wins
    ("matmul (mm/bmm/addmm)", ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul")),
    ("output softmax + loss", ("log_softmax", "nll_loss")),
    ("attention softmax", ("aten::_softmax", "_softmax_backward", "scaled_dot_product", "flash_attention")),
    ("dropout mask (RNG, compare)", ("aten::random_", "aten::ge", "aten::bernoulli")),
    ("dtype casts / copies", ("aten::copy_", "aten::_to_copy")),
    ("other elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean",
                           "aten::neg", "aten::cat", "aten::div", "aten::sum", "aten::fill_", "aten::where",
                           "aten::masked_fill", "aten::index", "aten::sub", "aten::cos", "aten::sin")),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--shapes", action="store_true", help="one table row per op and input shapes")
    ap.add_argument("--rows", type=int, default=12, help="rows of the op table")
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import cpu_lock
    from loralab.config import RunConfig
    from loralab.model.attention import packs_one_row
    from loralab.prepare import setup_model
    from loralab.train.loop import micro_batches
    from loralab.train.step import accumulate_gradients
    from workload import LORA, encoded_data

    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    cfg.model.attn_implementation = a.attn
    cfg.train.batch_size, cfg.train.packing, cfg.train.precision = a.batch, a.packed, a.precision
    model, tok, _, _ = setup_model(cfg, torch.device("cpu"))
    enc, _ = encoded_data(tok, a.examples, 42)
    one_row = a.packed and packs_one_row(model)  # the layout the loop gives this model
    batch = next(micro_batches(enc, cfg.train, tok.pad_token_id, one_row=one_row))  # a run's first micro batch
    real = int(batch["attention_mask"].sum())
    model.train()

    def step():  # forward + backward; no optimizer step
        accumulate_gradients(model, [batch])
        model.zero_grad(set_to_none=True)

    if not a.no_lock:
        cpu_lock.acquire("profile_step")
    try:
        step()  # warm up (and loss.py's one-time head check)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        cpu0, t0 = time.process_time(), time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
            step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        if not a.no_lock:
            cpu_lock.release()
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        group = next((g for g, keys in GROUPS if any(k in ev.key for k in keys)), "rest")
        totals[group] = totals.get(group, 0.0) + ev.self_cpu_time_total / 1e6
    all_s = sum(totals.values())
    print(f"batch {tuple(batch['input_ids'].shape)} ({real} real tokens), packed={a.packed}, "
          f"attention={model.config._attn_implementation}; unprofiled steps {', '.join(f'{t:.2f}' for t in times)} s; "
          f"profiled step {wall:.2f} s wall, {cpu / wall:.2f} cores busy")
    print(f"{'group':<30} {'self CPU s':>10} {'share':>7}   (profiler self time; sums over ops)")
    for g, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{g:<30} {v:>10.2f} {100 * v / all_s:>6.1f}%")
    averages = prof.key_averages(group_by_input_shape=a.shapes)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from loralab.runtime.allocator import reexec_with_allocator

    # the malloc the `loralab` command runs on: on glibc's, the output layer's fresh 50 MB buffers fault
    # their pages in on every use, and its dtype copies showed 6-8% of a bf16 step instead of <1%
    reexec_with_allocator()
    sys.exit(main())
