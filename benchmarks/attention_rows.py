"""Eager vs SDPA attention by row length: the measurement behind `model.attn_implementation=auto`
on the CPU (eager up to `loralab.io.models.EAGER_MAX_ROW` tokens per row, SDPA beyond).

    .venv/bin/python benchmarks/attention_rows.py [--lengths 128,256,512,1024,2048] [--tokens 1024]
        [--rounds 4] [--threads N] [--precision auto|bf16|fp32] [--json out.json]

One model (loralab's default setup: LoRA r=16 on every linear layer, bf16 weights where the CPU has
bf16) and the loop's loss; for each row length, micro batches of `--tokens` tokens (at least one
row) stepped forward + backward with each implementation in turn, interleaved and rotated so a
shared machine's drifts hit both alike. Prints one JSON object: per length the median step time of
each and the median of the paired ratios sdpa / eager (< 1: SDPA faster). Peak memory per
implementation is scaling.py's job (separate processes). Respects /tmp/loralab_cpu_lock.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPLS = ("eager", "sdpa")


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

    import throughput as T
    from loralab.config import RunConfig
    from loralab.io.models import EAGER_MAX_ROW
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

    def step(batch) -> float:
        t0 = time.perf_counter()
        s, n = loss_sum(model, batch)
        (s / n).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    if not a.no_lock:
        T.USE_LOCK = True
        T.acquire_lock("attention_rows")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    result = {"precision": dtype, "threads": torch.get_num_threads(), "eager_max_row": EAGER_MAX_ROW,
              "load_average_before": os.getloadavg()[0], "lengths": []}
    try:
        for length in (int(x) for x in a.lengths.split(",")):
            ids = torch.randint(0, model.config.vocab_size, (max(1, a.tokens // length), length),
                                generator=torch.Generator().manual_seed(length))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            times = {i: [] for i in IMPLS}
            for r in range(a.rounds + 1):
                for impl in IMPLS[r % 2:] + IMPLS[:r % 2]:  # rotate who goes first
                    model.set_attn_implementation(impl)
                    dt = step(batch)
                    if r:  # round 0 warms up
                        times[impl].append(dt)
            row = {"length": length, "rows": ids.shape[0],
                   **{f"{i}_step_s": statistics.median(times[i]) for i in IMPLS},
                   "sdpa_over_eager": statistics.median(s / e for s, e in zip(times["sdpa"], times["eager"]))}
            result["lengths"].append(row)
            print(f"length {length} x {row['rows']} rows: eager {row['eager_step_s']:.2f} s, "
                  f"sdpa {row['sdpa_step_s']:.2f} s, sdpa / eager {row['sdpa_over_eager']:.2f}",
                  file=sys.stderr, flush=True)
    finally:
        if not a.no_lock:
            T.release_lock()
    result["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
