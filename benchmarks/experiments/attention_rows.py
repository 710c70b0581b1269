"""Eager, eager with its core recomputed, and SDPA attention by row length: the measurement behind
`model.attn_implementation=auto` on the CPU (eager_recompute up to `loralab.model.attention.eager_max_row()`
tokens per row, SDPA beyond).

    .venv/bin/python benchmarks/experiments/attention_rows.py [--lengths 128,256,512,1024,2048] [--tokens 1024]
        [--rounds 4] [--threads N] [--precision auto|bf16|fp32] [--json out.json]

One model (loralab's default setup: LoRA r=16 on every linear layer, bf16 weights where the CPU has
bf16) and the loop's loss; for each row length, micro batches of `--tokens` tokens (at least one
row) stepped forward + backward with each implementation in turn, interleaved and rotated so a
shared machine's drifts hit all alike. Prints one JSON object: per length the median step time of
each, the median of the paired ratios to eager (< 1: faster than eager), and the bytes each keeps
for backward (storages counted once, through autograd's saved-tensor hooks: exact, whatever the
load). Respects /tmp/loralab_cpu_lock.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers

IMPLS = ("eager", "eager_recompute", "sdpa")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,256,512,1024,2048")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per micro batch (rows = tokens / length)")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds per length, after one warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch

    import cpu_lock
    from loralab.config import RunConfig
    from loralab.model.attention import eager_max_row, register
    from loralab.prepare import setup_model
    from loralab.train.loss import loss_sum
    from workload import LORA, MODEL

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = RunConfig()
    cfg.model.name = MODEL
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    cfg.train.precision = a.precision
    cfg.model.attn_implementation = "eager"  # not auto: this benchmark sets the implementation itself
    model = setup_model(cfg, torch.device("cpu"))[0].train()

    register()

    def step(batch) -> tuple[float, int]:
        seen, saved = set(), [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                saved[0] += t.untyped_storage().nbytes()
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s, n = loss_sum(model, batch)
        (s / n).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, saved[0]

    if not a.no_lock:
        cpu_lock.acquire("attention_rows")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    result = {"precision": dtype, "threads": torch.get_num_threads(), "eager_max_row": eager_max_row(),
              "load_average_before": os.getloadavg()[0], "lengths": []}
    try:
        for length in (int(x) for x in a.lengths.split(",")):
            ids = torch.randint(0, model.config.vocab_size, (max(1, a.tokens // length), length),
                                generator=torch.Generator().manual_seed(length))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            times, saved = {i: [] for i in IMPLS}, {}
            for r in range(a.rounds + 1):
                k = r % len(IMPLS)
                for impl in IMPLS[k:] + IMPLS[:k]:  # rotate who goes first
                    model.set_attn_implementation(impl)
                    dt, saved[impl] = step(batch)
                    if r:  # round 0 warms up
                        times[impl].append(dt)
            row = {"length": length, "rows": ids.shape[0]}
            for i in IMPLS:
                row[f"{i}_step_s"] = statistics.median(times[i])
                row[f"{i}_over_eager"] = statistics.median(t / e for t, e in zip(times[i], times["eager"]))
                row[f"{i}_saved_mb"] = round(saved[i] / 2**20, 1)
            result["lengths"].append(row)
            print(f"length {length} x {row['rows']} rows: " + ", ".join(
                f"{i} {row[f'{i}_step_s']:.2f} s ({row[f'{i}_over_eager']:.2f}x, saves {row[f'{i}_saved_mb']:.0f} MB)"
                for i in IMPLS), file=sys.stderr, flush=True)
    finally:
        if not a.no_lock:
            cpu_lock.release()
    result["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
