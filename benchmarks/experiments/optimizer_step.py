"""The optimizer step over the demo's LoRA parameters (the default model, top 20 layers, rank 16 on
every linear layer: 280 tensors, 3.26 M values), torch's fused kernel against foreach, paired in
one process (alternating rounds). loralab.train.optim.implementation picks fused where it applies.

    .venv/bin/python benchmarks/experiments/optimizer_step.py [--optimizer adamw|sgd] [--rounds 5] [--no-lock]

Prints JSON: the median milliseconds per step of each, their ratio, and the largest difference
between the two's parameters after the rounds (the same start and gradients). Respects
/tmp/loralab_cpu_lock.
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
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps timed per round")
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch

    import cpu_lock
    import loralab.train.optim as optim
    from loralab.config import load_config
    from loralab.prepare import resolve_config, setup_model
    from loralab.study.spec import DEMO_CONFIG
    from workload import demo_overrides

    cpu_lock.enabled = not a.no_lock
    overrides = demo_overrides() + [f"train.optimizer={a.optimizer}"]
    cfg = resolve_config(load_config(DEMO_CONFIG, overrides), torch.device("cpu"))
    model, _, _, _ = setup_model(cfg, torch.device("cpu"))
    trained = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in trained]
    ways = {"fused": {"fused": True}, "foreach": {"foreach": True}}
    copies, opts, picks = {}, {}, optim.implementation
    for way, kw in ways.items():
        copies[way] = [torch.nn.Parameter(p.detach().clone()) for p in trained]
        for p, g in zip(copies[way], grads):
            p.grad = g.clone()
        optim.implementation = lambda _params, kw=kw: kw  # noqa: E731  (the library's optimizer, this way)
        opts[way] = optim.build_optimizer(copies[way], cfg.train)
    optim.implementation = picks
    times: dict[str, list[float]] = {w: [] for w in ways}
    cpu_lock.acquire("optimizer_step")
    try:
        for _ in range(a.rounds):
            for way in ways:
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    opts[way].step()
                times[way].append((time.perf_counter() - t0) / a.steps * 1e3)
    finally:
        cpu_lock.release()
    diff = max(float((x - y).detach().abs().max()) for x, y in zip(copies["fused"], copies["foreach"]))
    med = {w: round(statistics.median(t), 2) for w, t in times.items()}
    print(json.dumps({"optimizer": a.optimizer, "tensors": len(trained),
                      "values": sum(p.numel() for p in trained), "threads": torch.get_num_threads(),
                      "median_ms_per_step": med, "foreach_over_fused": round(med["foreach"] / med["fused"], 2),
                      "max_abs_difference": diff}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
