"""Where a run computes and in what precision: the one place `train.precision: auto` is resolved."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from ..io.fileio import write_json
from ..io.models import cache_root
from ..runtime import cpu

PRECISIONS = ("bf16", "fp32")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# A CPU with bf16 instructions trains in bf16 only where its bf16 matmuls measure at least this much faster
# than fp32's. Flags alone mislead: an Intel Xeon VM with AVX512-BF16 (AMX hidden) ran them slower than
# fp32, where an AMD EPYC with the same flag runs them faster (docs/performance.md, "CPU kinds").
BF16_MIN_SPEEDUP = 1.0
_PROBE = (640, 576, 1536)  # rows x in x out: the demo's micro batch through a 576-wide model's MLP layer
_PROBE_FILE = "cpu_bf16.json"


def measure_bf16_speedup(rounds: int = 5) -> float:
    """fp32 time / bf16 time of one model-sized linear layer on this CPU, best of `rounds` interleaved."""
    rows, d_in, d_out = _PROBE
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    pairs = {dt: (x.to(dt), w.to(dt)) for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    for a, b in pairs.values():
        F.linear(a, b)  # the first call builds oneDNN's kernel
    for _ in range(rounds):
        for dt, (a, b) in pairs.items():
            start = time.perf_counter()
            for _ in range(4):
                F.linear(a, b)
            best[dt] = min(best[dt], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def _probe_key(info: str) -> str:
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads" + (f" | {cap}" if cap else "")


def bf16_speedup() -> float | None:
    """This CPU's measured bf16 speed-up over fp32, or None where it has no bf16 instructions (AVX2-only
    CPUs, or oneDNN capped below them): torch emulates bf16 there, hundreds of times slower than fp32
    (docs/performance.md), so there is nothing to measure. Measured once per CPU
    model, torch version, thread count and oneDNN cap, and cached under loralab's cache folder; a file
    lock makes the ranks of a distributed run agree."""
    info = cpu.cpu_info()
    if cpu.isa_capped_below_bf16() or ("amx_bf16" not in info and "avx512_bf16" not in info):
        return None
    key = _probe_key(info)
    path = cache_root() / _PROBE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:  # no writable cache folder: measure every time rather than fail
        return measure_bf16_speedup()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank measures, the others read its result
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        if not isinstance(known.get(key), (int, float)):
            known[key] = round(measure_bf16_speedup(), 3)
            write_json(path, known)
            print(f"loralab: this CPU's bf16 matmuls run {known[key]:.2f}x fp32's (measured once; {path})",
                  file=sys.stderr)
        return float(known[key])


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls in hardware (AMX or AVX512-BF16) that measure faster than fp32's."""
    speedup = bf16_speedup()
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> bf16 where the hardware has fast bf16 matmuls (CUDA sm80+; CPUs with AMX/AVX512-BF16 whose
    bf16 matmuls measure faster than fp32's), else fp32; 'bf16' and 'fp32' are kept. Every caller (the
    pipeline, the loop, benchmarks) uses this."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"
