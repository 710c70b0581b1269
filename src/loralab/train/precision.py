"""Where a run computes and in what precision: the one place `train.precision: auto` is resolved."""
from __future__ import annotations

import os
from pathlib import Path

import torch

PRECISIONS = ("bf16", "fp32")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) from which its matmuls have bf16 instructions
_BF16_ISA_MARKS = ("BF16", "AMX", "FP16", "AVX10")


def isa_capped_below_bf16() -> bool:
    """ONEDNN_MAX_CPU_ISA (oneDNN's cap on the instructions its kernels may use, e.g. AVX2) set
    below AVX512_CORE_BF16: bf16 matmuls are emulated even where the CPU has them. It is how an
    AVX2-only CPU is reproduced on a newer one (docs/performance.md)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return bool(cap) and cap not in ("ALL", "DEFAULT") and not any(m in cap for m in _BF16_ISA_MARKS)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls in hardware. Elsewhere (AVX2-only CPUs) torch emulates bf16,
    hundreds of times slower than fp32 (0.2 vs 71 GFLOP/s on one core, docs/performance.md)."""
    if isa_capped_below_bf16():
        return False
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
