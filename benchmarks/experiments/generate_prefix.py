"""Paired A/B of held-out generation with and without the shared-prefix prefill
(loralab.eval.metrics: prompts' common first tokens run once at batch 1), on the demo's evaluation:
configs/demo.yaml's 100 + 100 held-out 2da / 2ds questions, one batch of 200, eval.max_new_tokens
new tokens, the default model with `make demo`'s (zero-initialised) LoRA layers, as the base
model's evaluation runs. Rounds alternate the two ways, so a shared machine's drift hits both alike.

    .venv/bin/python benchmarks/experiments/generate_prefix.py [--rounds 3] [--no-lock]

Prints JSON: the median seconds of each way, their median paired ratio, and whether the answers
were identical. Respects /tmp/loralab_cpu_lock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch

    import cpu_lock
    import loralab.eval.metrics as metrics
    from loralab.config import load_config
    from loralab.data.prompts import render_prompt
    from loralab.prepare import build_datasets, resolve_config, setup_model
    from loralab.study.spec import DEMO_CONFIG
    from workload import demo_overrides

    cpu_lock.enabled = not a.no_lock
    cfg = resolve_config(load_config(DEMO_CONFIG, demo_overrides()), torch.device("cpu"))
    data = build_datasets(cfg)
    model, tok, _, _ = setup_model(cfg, torch.device("cpu"))
    prompts = [render_prompt(ex, tok, template=cfg.data.template, system_prompt=cfg.data.system_prompt)
               for examples in data.tests.values() for ex in examples]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    ways = {"shared_prefix": metrics.MIN_SHARED_ROWS, "every_row_whole": 10**9}
    times: dict[str, list[float]] = {w: [] for w in ways}
    texts: dict[str, list[str]] = {}
    cpu_lock.acquire("generate_prefix")
    try:
        for _ in range(a.rounds):
            for way, rows in ways.items():
                metrics.MIN_SHARED_ROWS = rows
                t0 = time.perf_counter()
                gens = metrics.generate(model, tok, prompts, batch_size=len(prompts),
                                        max_new_tokens=cfg.eval.max_new_tokens)
                times[way].append(time.perf_counter() - t0)
                texts[way] = [g.text for g in gens]
    finally:
        cpu_lock.release()
    ratios = [b / s for s, b in zip(times["shared_prefix"], times["every_row_whole"])]
    print(json.dumps({
        "prompts": len(prompts), "shared_tokens": metrics.shared_prefix_length(ids),
        "prompt_tokens": sum(map(len, ids)), "max_new_tokens": cfg.eval.max_new_tokens,
        "threads": torch.get_num_threads(),
        "median_s": {w: round(statistics.median(t), 3) for w, t in times.items()},
        "speedup_median_paired": round(statistics.median(ratios), 3),
        "answers_identical": texts["shared_prefix"] == texts["every_row_whole"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
