"""oneDNN's primitive cache, bounded: memory a CPU run keeps for matmul shapes it will not see again.

oneDNN, torch's CPU backend for bf16 matmuls, caches every primitive it builds (one per exact shape,
dtype and layout), 1,024 of them by default, each with its own buffers. Packed and length-grouped micro
batches have a new token count almost every step, so the cache fills with the primitives of shapes
that never come back, and the heap around them cannot shrink. The throughput benchmark's packed step
needs few primitives, but the demo's, whose attention runs per row length, needs more than 64: 256 keeps
most of the memory saving at no measurable speed cost (docs/performance.md, "Measurements behind the
code": runtime/onednn.py).

oneDNN reads the capacity once, when it builds its first primitive, so loralab sets it on import
(before any matmul), and never over a value the user set (either of oneDNN's two names).
"""
from __future__ import annotations

import os

PRIMITIVE_CACHE_CAPACITY = 256  # the demo's step thrashes 64; a quarter of oneDNN's default still saves memory
_NAMES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def bound_primitive_cache() -> None:
    if not any(n in os.environ for n in _NAMES):
        os.environ[_NAMES[0]] = str(PRIMITIVE_CACHE_CAPACITY)
