"""oneDNN's primitive cache, bounded: memory a CPU run keeps for matmul shapes it will not see again.

oneDNN, torch's CPU backend for bf16 matmuls, caches every primitive it builds (one per exact shape,
dtype and layout), 1,024 of them by default, each with its own buffers. Packed and length-grouped micro
batches have a new token count almost every step, so the cache fills with the primitives of shapes
that never come back, and the heap around them cannot shrink. One step of a decoder needs fewer than 32
distinct primitives (the same shapes in all its blocks), so a small cache keeps every hit that
matters. Measured on the throughput benchmark's packed side (AMX Xeon, bf16, docs/performance.md):
peak RSS 3,071 -> 2,630 MB at the same tokens/s with 32; 16 was too few (-19% tokens/s).

oneDNN reads the capacity once, when it builds its first primitive, so loralab sets it on import
(before any matmul), and never over a value the user set (either of oneDNN's two names).
"""
from __future__ import annotations

import os

PRIMITIVE_CACHE_CAPACITY = 64  # twice what one step needs: headroom for models and variants with more shapes
_NAMES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def bound_primitive_cache() -> None:
    if not any(n in os.environ for n in _NAMES):
        os.environ[_NAMES[0]] = str(PRIMITIVE_CACHE_CAPACITY)
