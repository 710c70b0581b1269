"""Where a run computes and in what precision: the one place `train.precision: auto` is resolved."""
from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = ("bf16", "fp32")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls in hardware. Elsewhere (AVX2-only CPUs) torch emulates bf16,
    many times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> bf16 where the hardware has fast bf16 matmuls (CUDA sm80+, CPUs with AMX/AVX512-BF16),
    else fp32; 'bf16' and 'fp32' are kept. Every caller (the pipeline, the loop, benchmarks) uses this."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"
