"""1 process vs N processes (DDP, FSDP2) on the same global batch: tokens/s and peak memory per rank.

    .venv/bin/python benchmarks/distributed_scaling.py [--steps 12] [--nproc 2] [--json out.json]

Each side is `loralab train configs/demo.yaml` with the same global batch (micro batch x processes
constant), no evaluation, in its own process(es); on the CPU the cores are split between the ranks
(train.threads = cores / N), so the comparison asks what data parallelism buys on one machine's
CPU: nothing is expected on 2 cores (the ranks share them). Prints one JSON object with each side's
tokens/s, per-rank peaks and the ratios to the one-process side. Holds /tmp/loralab_cpu_lock while
it times (waits while a colleague holds it), as the other benchmarks do.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_side(out: Path, nproc: int, mode: str, steps: int, global_batch: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    cmd = [sys.executable, "-m", "loralab.cli", "train", str(ROOT / "configs" / "demo.yaml"), f"output_dir={out}",
           f"train.max_steps={steps}", f"train.batch_size={global_batch // nproc}", "eval.before=false",
           "eval.tasks=[]", "data.val_fraction=0", "train.progress=false", f"train.threads={threads}",
           "resume=false", f"train.distributed={mode}",
           # LoRA dropout draws its masks per rank, so with dropout the sides would differ by the
           # dropout noise: without it the final losses must agree (bf16 rounding aside)
           "lora.dropout=0"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} x{nproc} failed: {proc.stderr.strip().splitlines()[-1:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"processes": nproc, "mode": mode if nproc > 1 else "one process", "threads_per_rank": threads,
            "tokens_per_s": s["tokens_per_s"], "runtime_s": s["runtime_s"], "train_tokens": s["train_tokens"],
            "final_train_loss": s["final_train_loss"], "peak_memory_bytes_per_rank": s["peak_memory_bytes_per_rank"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=16, help="examples per micro batch, all ranks together")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from cpu_lock import acquire, release

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="loralab-dist-") as tmp:
        acquire("distributed_scaling")
        try:
            sides = [run_side(Path(tmp) / "one", 1, "auto", a.steps, a.global_batch)]
            for mode in ("ddp", "fsdp"):
                sides.append(run_side(Path(tmp) / mode, a.nproc, mode, a.steps, a.global_batch))
        finally:
            release()
    load.append(os.getloadavg()[0])
    base = sides[0]
    for s in sides:
        s["tokens_per_s_ratio"] = s["tokens_per_s"] / base["tokens_per_s"]
        s["peak_per_rank_ratio"] = max(s["peak_memory_bytes_per_rank"]) / max(base["peak_memory_bytes_per_rank"])
        s["loss_diff"] = s["final_train_loss"] - base["final_train_loss"]
    cpu = sorted(set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512_bf16", "amx_bf16"})
    result = {"steps": a.steps, "global_batch": a.global_batch, "cpu_flags": cpu, "cores": os.cpu_count(),
              "load_average_start_end": load, "sides": sides}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
