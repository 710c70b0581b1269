"""LoRA vs QLoRA on the default model, same data, steps and seed, in one run: the article's trade-off.

    .venv/bin/python benchmarks/experiments/qlora_tradeoff.py [--steps 40] [--batch 16] [--rounds 1] [--json out.json]

Each side is `loralab train configs/demo.yaml` (LoRA r=16 on every linear layer, 2-digit add/sub)
with `model.quant=none` or `model.quant=nf4`, run as its own process so its peak memory (peak RSS
of the training phase) is clean; no evaluation. Sides alternate (LoRA, QLoRA, LoRA, ...) over
`--rounds` so slow phases of a shared machine hit both. Reported per side: median step time (after
the first 3 steps), peak memory, final training loss (mean of the last 10% of steps), and the ratios
QLoRA / LoRA beside the article's (Llama-2-7B on an A100: memory 14.18 / 21.33 GB = 0.66x, time
10,059.53 / 6,685.75 s = 1.50x).

What to expect at 135M on a CPU: NF4 saves ~0.2 GB of weights, while the peak is mostly activations
and the runtime, so the memory ratio is near 1; at 7B the weights are 13.5 of 21 GB and NF4 cuts them
to ~3.6 GB. `loralab estimate --model llama-2-7b --method qlora ...` shows that side.
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
ARTICLE = {"memory_ratio": 14.18 / 21.33, "time_ratio": 10059.53 / 6685.75}
SKIP_STEPS = 3  # the first steps pay one-time costs (allocator growth, kernel selection)


def run_side(quant: str, out: Path, steps: int, batch: int) -> dict:
    wait_for_lock()
    cmd = [sys.executable, "-m", "loralab.cli", "train", str(ROOT / "configs" / "demo.yaml"),
           f"model.quant={quant}", f"train.max_steps={steps}", f"train.batch_size={batch}",
           "eval.tasks=[]", "eval.before=false", "train.progress=false", f"output_dir={out}", "resume=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{quant} run failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    summary = json.loads((out / "summary.json").read_text())
    steps_log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps_log, steps_log[1:])][SKIP_STEPS:]
    losses = [s["loss"] for s in steps_log]
    tail = losses[-max(1, len(losses) // 10):]
    return {"step_s": statistics.median(times), "peak_memory_bytes": summary["peak_memory_bytes"],
            "final_loss": sum(tail) / len(tail), "tokens_per_s": summary["tokens_per_s"],
            "runtime_s": summary["runtime_s"], "losses": losses}


def combine(runs: list[dict]) -> dict:
    """Several rounds of one side: medians of the timings, the largest peak, the (identical) loss."""
    return {"step_s": statistics.median(r["step_s"] for r in runs),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
            "final_loss": runs[0]["final_loss"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "losses": runs[0]["losses"], "rounds": [{k: v for k, v in r.items() if k != "losses"} for r in runs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="micro batch (demo: 16, ~0.6k tokens)")
    p.add_argument("--rounds", type=int, default=1, help="LoRA/QLoRA pairs, alternating")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    sides = {"lora": [], "qlora": []}
    with tempfile.TemporaryDirectory(prefix="loralab-qlora-") as tmp:
        for k in range(args.rounds):
            for name, quant in (("lora", "none"), ("qlora", "nf4")):
                sides[name].append(run_side(quant, Path(tmp) / f"{name}-{k}", args.steps, args.batch))
                print(f"round {k + 1}: {name} step {sides[name][-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
    lora, qlora = combine(sides["lora"]), combine(sides["qlora"])
    result = {
        "model": "smollm2-135m", "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
        "lora": lora, "qlora": qlora,
        "memory_ratio": qlora["peak_memory_bytes"] / lora["peak_memory_bytes"],
        "step_time_ratio": qlora["step_s"] / lora["step_s"],
        "final_loss_diff_pct": 100 * (qlora["final_loss"] - lora["final_loss"]) / lora["final_loss"],
        "article": ARTICLE,
    }
    gb = lambda b: f"{b / 1e9:.2f} GB"
    print(f"{'side':<7} {'step (median)':>14} {'tokens/s':>9} {'peak memory':>12} {'final loss':>11}")
    for name, s in (("LoRA", lora), ("QLoRA", qlora)):
        print(f"{name:<7} {s['step_s']:>12.3f} s {s['tokens_per_s']:>9.0f} {gb(s['peak_memory_bytes']):>12} "
              f"{s['final_loss']:>11.4f}")
    print(f"QLoRA / LoRA: memory {result['memory_ratio']:.2f}x (article {ARTICLE['memory_ratio']:.2f}x), "
          f"step time {result['step_time_ratio']:.2f}x (article {ARTICLE['time_ratio']:.2f}x), "
          f"final loss {result['final_loss_diff_pct']:+.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
