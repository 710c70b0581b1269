"""`make gpu-check`: loralab's CUDA paths proven in one short run, the article's 7B rows and the memory
estimate measured, speed against the GPU stacks (docs/gpu.md).

    python benchmarks/gpu_check.py [--out runs/gpu-check] [--parts nf4,fused,...]
    python benchmarks/gpu_check.py --device cpu --tiny      # the same script end to end on tiny models

On a machine without CUDA (and no --device cpu) it says so in one line and exits 0. Every part runs fixed
step counts and its wall time is printed and recorded; one failing part is a row with its error, the others
still run. Writes gpu_check.json and gpu_check.md to --out; exits 1 when a row failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "gpu_check"), str(HERE)]  # the parts import each other and throughput's workers

ORDER = ("nf4", "qlora_layer", "autocast", "packed_attention", "dropout", "fused", "compile", "preflight",
         "ddp", "fsdp", "article", "grid", "stacks")


def all_parts() -> dict:
    import dist_check
    import memory_rows
    import paths
    import stacks

    return {**paths.PARTS, **dist_check.PARTS, **memory_rows.PARTS, **stacks.PARTS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models and shapes instead of 7B (the CPU mode)")
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--parts", default=",".join(ORDER), help="comma list of: " + ", ".join(ORDER))
    a = ap.parse_args(argv)
    import torch

    if a.device in ("auto", "cuda") and not torch.cuda.is_available():
        import shutil

        why = "this torch is a CPU build: install a CUDA one (make gpu-check TORCH=... from a CUDA index)" \
            if shutil.which("nvidia-smi") and torch.version.cuda is None else "nothing to check"
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); {why}: run it on a GPU machine, "
              "or `--device cpu --tiny` for the CPU mode")
        return 0
    if a.device == "cpu" and not a.tiny:
        ap.error("--device cpu runs tiny shapes only: add --tiny")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(ORDER))
    if unknown:
        ap.error(f"unknown parts {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    from common import FAIL, Ctx, row
    from report import environment, write

    device = torch.device("cuda", 0) if a.device != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = 2 if device.type == "cuda" and torch.cuda.device_count() >= 2 else 1
    ctx = Ctx(device=device, tiny=a.tiny, out=Path(a.out), world=world)
    ctx.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    registry = all_parts()
    rows, times = [], {}
    t_all = time.perf_counter()
    for name in parts:
        t0 = time.perf_counter()
        try:
            got = registry[name](ctx)
        except (Exception, SystemExit) as e:  # one broken part is a failed row; the others still run
            got = [row(name, "the part ran", FAIL, f"{type(e).__name__}: {e}"[:500])]
            traceback.print_exc(file=sys.stderr)
        times[name] = round(time.perf_counter() - t0, 2)
        rows += got
        bad = [r for r in got if r["status"] == FAIL]
        print(f"gpu-check: {name:<17} {times[name]:7.1f} s  {len(got) - len(bad)}/{len(got)} ok"
              + (f"  FAILED: {'; '.join(r['check'] for r in bad)}" if bad else ""), flush=True)
    total = round(time.perf_counter() - t_all, 2)
    result = {"device": str(device), "tiny": a.tiny, "environment": environment(device), "parts": parts,
              "part_wall_s": times, "total_wall_s": total, "steps": ctx.steps, "rows": rows}
    json_path, md_path = write(result, ctx.out)
    failed = [r for r in rows if r["status"] == FAIL]
    print(f"gpu-check: {len(rows) - len(failed)}/{len(rows)} rows ok in {total:.1f} s -> {json_path}, {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
