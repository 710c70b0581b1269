"""What the CPU offers: its flags (/proc/cpuinfo) and the instructions oneDNN is allowed to use.

The one home of these checks: train/precision.py decides bf16 from them, model/attention.py the attention
kernel (SDPA's bf16 kernels run on AMX tiles where the CPU has them)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) from which its matmuls have bf16 instructions
_BF16_ISA_MARKS = ("BF16", "AMX", "FP16", "AVX10")


@functools.cache  # read once: the attention choice asks per micro batch
def cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _isa_cap() -> str:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return "" if cap in ("ALL", "DEFAULT") else cap


def isa_capped_below_bf16() -> bool:
    """ONEDNN_MAX_CPU_ISA (oneDNN's cap on the instructions its kernels may use, e.g. AVX2) set
    below AVX512_CORE_BF16: bf16 matmuls are emulated even where the CPU has them. It is how an
    AVX2-only CPU is reproduced on a newer one (docs/performance.md)."""
    cap = _isa_cap()
    return bool(cap) and not any(m in cap for m in _BF16_ISA_MARKS)


def has_amx() -> bool:
    """AMX tiles for bf16 (`amx_bf16`), not capped away by ONEDNN_MAX_CPU_ISA."""
    cap = _isa_cap()
    return "amx_bf16" in cpu_info() and (not cap or "AMX" in cap)
