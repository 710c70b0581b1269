"""How cost grows with the work: tokens/s and peak memory of a training step vs sequence length and
batch size, loralab and the baseline in one run, plotted.

    .venv/bin/python benchmarks/scaling.py [--lengths 128,256,512,1024,2048] [--batches 1,2,4,8,16,32]
        [--steps 2] [--precision auto|bf16|fp32] [--json scaling.json] [--plot docs/scaling.png]

Two sweeps: sequence length at batch 1, and batch size at the first length (128). Each point is
one micro batch of that shape, every position a real token with a label (no padding, so both sides
do the same work), stepped `--steps` times (forward + backward; no optimizer: it is the same small
AdamW over the LoRA factors for both), reported as the median step's tokens/s and the peak RSS of
the point's steps (glibc's free heap trimmed and the peak reset before each point).
  - loralab: `prepare.setup_model` with the default config (LoRA r=16 on every linear layer, bf16
    weights where the CPU has bf16, attention as `model.attn_implementation=auto` picks it) and the
    loop's loss (`train.loss.loss_sum`: the output layer only where labels are, in chunks).
  - baseline: PEFT's `get_peft_model` on fp32 weights and the model's own loss
    (`model(input_ids, labels=...)`), under bf16 autocast where the precision is bf16: the step
    `transformers.Trainer` runs (throughput.py's `baseline` side, without the Trainer around it).
Each side and sweep runs in its own process, points in increasing size. A short run (few steps per
point) to show the shape of the curves, not a precise throughput: that is throughput.py's job.
Holds /tmp/loralab_cpu_lock per process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import worker_env  # noqa: E402

HERE = Path(__file__).resolve()
SIDES = ("loralab", "baseline")


def _model(side: str, precision: str):
    """(model, autocast dtype or None) for one side, in train mode."""
    import torch

    from loralab.config import RunConfig
    from loralab.prepare import setup_model
    from workload import LORA, MODEL

    cfg = RunConfig()
    cfg.model.name = MODEL
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    cfg.train.precision = precision
    if side == "loralab":
        model = setup_model(cfg, torch.device("cpu"))[0]
        return model.train(), None
    from transformers import AutoModelForCausalLM

    from loralab.io.models import resolve
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve(MODEL)), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return model.train(), (torch.bfloat16 if precision == "bf16" else None)


def worker(side: str, points: list[list[int]], steps: int, precision: str) -> list[dict]:
    """Time `steps` forward + backward passes of a (batch, length) micro batch per point."""
    import contextlib

    import torch

    from loralab.memory.measure import PeakMemory, release_free_memory
    from loralab.train.loss import loss_sum

    model, autocast = _model(side, precision)
    vocab = model.config.vocab_size

    def step(ids):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            if side == "loralab":
                s, n = loss_sum(model, batch)
                loss = s / n
            else:
                loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(0)
    step(torch.randint(0, vocab, (1, 32), generator=gen))  # warm-up: one-time checks, kernel choice
    out = []
    for batch, length in points:
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        release_free_memory()
        times = []
        with PeakMemory("cpu") as pm:
            for _ in range(steps):
                t0 = time.perf_counter()
                step(ids)
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        out.append({"batch": batch, "length": length, "tokens": batch * length, "step_s": t,
                    "tokens_per_s": batch * length / t, "peak_memory_bytes": pm.result()["peak_memory_bytes"],
                    "load_average": os.getloadavg()[0]})
        print(f"{side} batch {batch} x {length}: {out[-1]['tokens_per_s']:.0f} tokens/s, "
              f"{out[-1]['peak_memory_bytes'] / 2**30:.2f} GB", file=sys.stderr, flush=True)
    return out


def run(side: str, points: list[tuple[int, int]], steps: int, precision: str, lock: bool) -> list[dict]:
    import cpu_lock

    cpu_lock.enabled = lock
    cpu_lock.acquire(f"scaling {side}")
    try:
        with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
            out = Path(tmp) / "out.json"
            env = worker_env(side == "loralab")
            cmd = [sys.executable, str(HERE), "--worker", side, json.dumps(points), str(steps), precision, str(out)]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not out.exists():
                raise SystemExit(f"scaling worker {side} failed (exit {proc.returncode}):\n"
                                 + "\n".join(proc.stderr.strip().splitlines()[-15:]))
            return json.loads(out.read_text())
    finally:
        cpu_lock.release()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (sweep, key, label) in enumerate((("length", "length", "sequence length (batch 1)"),
                                               ("batch", "batch", f"batch size (length {result['batch_length']})"))):
        for side in SIDES:
            pts = result["sweeps"][sweep][side]
            xs = [p[key] for p in pts]
            axes[0][col].plot(xs, [p["tokens_per_s"] for p in pts], "o-", label=side)
            axes[1][col].plot(xs, [p["peak_memory_bytes"] / 2**30 for p in pts], "o-", label=side)
        for row, ylabel in enumerate(("tokens/s", "peak memory (GB, RSS)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"smollm2-135m, LoRA r=16, {result['precision']}, one micro batch per point, "
                 f"{result['steps']} step(s) per point (CPU: {', '.join(result['cpu_flags'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, points, steps, precision, out = sys.argv[2:7]
        Path(out).write_text(json.dumps(worker(side, json.loads(points), int(steps), precision)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,256,512,1024,2048")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()
    import throughput as T
    from loralab.train.precision import resolve_precision

    lengths = [int(x) for x in a.lengths.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    precision = resolve_precision(a.precision, "cpu")
    t0 = time.perf_counter()
    result = {"precision": precision, "steps": a.steps, "cpu_flags": T.cpu_flags(), "batch_length": lengths[0],
              "load_average_before": os.getloadavg()[0], "sweeps": {"length": {}, "batch": {}}}
    for sweep, points in (("length", [(1, n) for n in lengths]), ("batch", [(b, lengths[0]) for b in batches])):
        for side in SIDES:
            result["sweeps"][sweep][side] = run(side, points, a.steps, precision, not a.no_lock)
    result["total_s"] = time.perf_counter() - t0
    # MB of peak memory each extra token costs, between consecutive lengths: constant when memory
    # grows linearly in tokens, rising with the length when something grows as length squared
    for side in SIDES:
        pts = result["sweeps"]["length"][side]
        result[f"{side}_mb_per_extra_token"] = [
            {"from": p["length"], "to": q["length"],
             "mb": round((q["peak_memory_bytes"] - p["peak_memory_bytes"]) / (q["tokens"] - p["tokens"]) / 2**20, 3)}
            for p, q in zip(pts, pts[1:])]
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    if a.plot:
        plot(result, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
