"""How fast this CPU computes, for a time plan (throughput.py) made before a CPU run or study starts.

CPUs differ by several times in what one thread does per second (AVX2 in fp32, AVX-512 in bf16,
AMX), so a CPU plan measures instead of assuming: a model-sized linear layer (train/precision.py's
probe shape) in the run's precision, on the run's thread count, for a fraction of a second. Training
and plain forwards reach the shares of that rate below; the plan counts the same FLOPs as a GPU
plan, plus a start-up per run (process, imports, model load).
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from .throughput import Device

# Shares of the probe's rate the plan's FLOP counts run at (docs/studies.md, "What a study is made of": the
# cpu-scale runs of SmolLM2-135M against this plan with both at 1). A forward's count takes the output layer
# at every position, which a loss computes only at labelled ones: hence a share of 1 for forwards.
CPU_TRAIN_UTILISATION = 0.85
CPU_FORWARD_UTILISATION = 1.0
CPU_BANDWIDTH = 10e9      # bytes/s a decode step's weight reads get: one socket's share, roughly
RUN_START_S = 12.0        # a run's own process: imports, data, the model's load, before its first step
PROBE = (640, 576, 1536)  # rows x in x out: as train/precision.py's bf16 probe
PROBE_SECONDS = 0.3
PROBE_SLICE = 16           # rows of a first call that says whether the kernel is fast enough for all


def measure_flops(dtype: torch.dtype = torch.float32, threads: int = 1, seconds: float = PROBE_SECONDS) -> float:
    """FLOP/s of the probe layer in `dtype` on `threads` threads (the best of short repeats). A kernel
    so slow that one full call would outlast `seconds` (bf16 where the CPU has no bf16 instructions:
    emulated, hundreds of times slower) is measured on a slice of the rows instead."""
    rows, d_in, d_out = PROBE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    w = torch.randn(d_out, d_in, generator=gen).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        start = time.perf_counter()
        F.linear(x[:PROBE_SLICE], w)  # also builds oneDNN's kernel
        if (time.perf_counter() - start) * rows / PROBE_SLICE > seconds:
            x, rows = x[:PROBE_SLICE], PROBE_SLICE
        best, end = float("inf"), time.perf_counter() + seconds
        while best == float("inf") or time.perf_counter() < end:
            start = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * rows * d_in * d_out / best


@functools.lru_cache(maxsize=8)
def cpu_device(precision: str = "fp32", threads: int = 1) -> Device:
    """This CPU as a time plan's Device, measured in `precision` (bf16 | fp32) on `threads` threads
    (once per process)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    flops = measure_flops(dtype, threads)
    return Device(f"this CPU ({threads} thread{'s' * (threads > 1)}, {precision}: {flops / 1e9:.0f} GFLOP/s measured)",
                  flops, CPU_BANDWIDTH, CPU_TRAIN_UTILISATION, CPU_FORWARD_UTILISATION)
