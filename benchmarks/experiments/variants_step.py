"""Step time and peak memory of the LoRA variants vs plain LoRA on the default model, same batches.

    .venv/bin/python benchmarks/experiments/variants_step.py [--steps 40] [--batch 16] [--rounds 1]
        [--sides lora,rslora,dora] [--json out.json]

Each side is `loralab train configs/demo.yaml` (SmolLM2-135M, LoRA r=16 on every linear layer,
dropout 0.05, 2-digit add/sub: the same data, seed and batches for every side) with the variant's
keys set (rslora: lora.use_rslora=true; dora: lora.use_dora=true; pissa: lora.init=pissa_niter_4;
loraplus: train.loraplus_lr_ratio=8), each run as its own process so its peak memory (peak RSS
of the training phase) is its own; no evaluation. Sides alternate over `--rounds` so slow phases
of a shared machine hit all of them. Reported per side: median step time (after the first 3
steps), peak memory, final training loss (mean of the last 10% of steps), and each side's ratios
to plain LoRA. The target (issue 13): DoRA at most 1.3x LoRA's step time; PEFT's DoRA is known
to be much slower than its LoRA (it materialises W + s·B A in every forward and, with dropout,
runs the base matmul twice).
The step-time ratios also come from an interleaved run (`--interleaved N`, default 12 rounds):
every side's model in one process (`loralab.pipeline.setup_model` with the side's keys), one
training step each in turn (`loralab.train.step.train_step`, same micro batches), N rounds, median
per side. On a shared machine whose load drifts over minutes, a side's separate process can land
in a busy phase; interleaving gives each side the same moments, so its ratios are the ones to read
(`interleaved.step_time_ratio`; the separate runs give peak memory and loss).
Respects /tmp/loralab_cpu_lock (waits while a colleague is timing something).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers
from cpu_lock import wait as wait_for_lock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SKIP_STEPS = 3  # the first steps pay one-time costs (allocator growth, kernel selection)
SIDES = {"lora": [], "rslora": ["lora.use_rslora=true"], "dora": ["lora.use_dora=true"],
         "pissa": ["lora.init=pissa_niter_4"], "loraplus": ["train.loraplus_lr_ratio=8"]}
TARGET_DORA_RATIO = 1.3


def run_side(name: str, out: Path, steps: int, batch: int) -> dict:
    wait_for_lock()
    cmd = [sys.executable, "-m", "loralab.cli", "train", str(ROOT / "configs" / "demo.yaml"), *SIDES[name],
           f"train.max_steps={steps}", f"train.batch_size={batch}", "eval.tasks=[]", "eval.before=false",
           "train.progress=false", f"output_dir={out}", "resume=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:])][SKIP_STEPS:] or [summary["runtime_s"]]
    losses = [s["loss"] for s in log]
    tail = losses[-max(1, len(losses) // 10):]
    return {"step_s": statistics.median(times), "peak_memory_bytes": summary["peak_memory_bytes"],
            "final_loss": sum(tail) / len(tail), "trainable_params": summary["trainable_params"],
            "estimated_peak_bytes": (summary.get("memory_breakdown") or {}).get("estimated_peak_bytes"),
            "runtime_s": summary["runtime_s"], "losses": losses}


def interleaved(names: list[str], rounds: int, batch: int) -> dict:
    """Median step time per side, the sides' steps taken in turn in one process (same batches)."""
    import time

    import torch

    from loralab.config import load_config
    from loralab.data.prompts import encode_all
    from loralab.prepare import build_datasets, resolve_config, setup_model
    from loralab.train.loop import micro_batches
    from loralab.train.optim import build_optimizer
    from loralab.train.state import set_seed
    from loralab.train.step import train_step

    wait_for_lock()
    device = torch.device("cpu")
    sides = {}
    for name in names:
        cfg = resolve_config(load_config(ROOT / "configs" / "demo.yaml", [*SIDES[name], f"train.batch_size={batch}"]),
                             device)
        set_seed(cfg.train.seed)
        model, tok, _, _ = setup_model(cfg, device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sides[name] = (model.train(), build_optimizer(named, cfg.train), [p for _, p in named])
    enc = encode_all(build_datasets(cfg).train, tok, template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                     max_seq_len=cfg.data.max_seq_len)[0]
    stream = micro_batches(enc, cfg.train, tok.pad_token_id)
    times: dict[str, list] = {n: [] for n in names}
    for _ in range(rounds + SKIP_STEPS):
        batch_ = next(stream)
        for name, (model, opt, params) in sides.items():
            t0 = time.perf_counter()
            train_step(model, [batch_], opt, params, max_grad_norm=cfg.train.max_grad_norm)
            times[name].append(time.perf_counter() - t0)
    step = {n: statistics.median(t[SKIP_STEPS:]) for n, t in times.items()}
    return {"rounds": rounds, "step_s": step, "step_time_ratio": {n: v / step["lora"] for n, v in step.items()}}


def combine(runs: list[dict]) -> dict:
    """Several rounds of one side: medians of the timings, the largest peak, the first run's loss."""
    return {"step_s": statistics.median(r["step_s"] for r in runs),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
            "final_loss": runs[0]["final_loss"], "trainable_params": runs[0]["trainable_params"],
            "estimated_peak_bytes": runs[0]["estimated_peak_bytes"], "losses": runs[0]["losses"],
            "rounds": [{k: v for k, v in r.items() if k != "losses"} for r in runs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="micro batch (demo: 16, ~0.6k tokens)")
    p.add_argument("--rounds", type=int, default=1, help="passes over the sides, alternating")
    p.add_argument("--sides", default="lora,rslora,dora", help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--interleaved", type=int, default=12, help="rounds of the in-process interleaved timing "
                   "(0: skip)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    names = [s for s in args.sides.split(",") if s]
    if "lora" not in names or set(names) - set(SIDES):
        raise SystemExit(f"--sides must include lora and come from {', '.join(SIDES)}")
    runs: dict[str, list] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="loralab-variants-") as tmp:
        for k in range(args.rounds):
            for name in names:
                runs[name].append(run_side(name, Path(tmp) / f"{name}-{k}", args.steps, args.batch))
                print(f"round {k + 1}: {name} step {runs[name][-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
    sides = {n: combine(r) for n, r in runs.items()}
    base = sides["lora"]
    for s in sides.values():
        s["step_time_ratio"] = s["step_s"] / base["step_s"]
        s["memory_ratio"] = s["peak_memory_bytes"] / base["peak_memory_bytes"]
    result = {"model": "smollm2-135m", "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
              "sides": sides, "target": {"dora_step_time_ratio_max": TARGET_DORA_RATIO}}
    if args.interleaved:
        result["interleaved"] = interleaved(names, args.interleaved, args.batch)
    ratios = result.get("interleaved", {}).get("step_time_ratio") or {n: s["step_time_ratio"] for n, s in sides.items()}
    if "dora" in sides:
        result["dora_meets_target"] = ratios["dora"] <= TARGET_DORA_RATIO
    gb = lambda b: f"{b / 1e9:.3f} GB"  # noqa: E731
    print(f"{'side':<9} {'step (median)':>14} {'x LoRA':>7} {'peak memory':>12} {'x LoRA':>7} {'final loss':>11}")
    for name, s in sides.items():
        print(f"{name:<9} {s['step_s']:>12.3f} s {s['step_time_ratio']:>6.2f}x {gb(s['peak_memory_bytes']):>12} "
              f"{s['memory_ratio']:>6.2f}x {s['final_loss']:>11.4f}")
    if "interleaved" in result:
        il = result["interleaved"]
        print(f"interleaved ({il['rounds']} rounds, one process): " + ", ".join(
            f"{n} {il['step_s'][n]:.3f} s ({il['step_time_ratio'][n]:.2f}x)" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
