"""Hand the heap holes of a CPU forward back to the OS (config `train.trim_heap`, off by default).

A training forward allocates each block's temporaries (norm and attention scratch, projections before
rotary, residual sums) between the tensors autograd keeps for backward, and glibc's malloc reuses few of
the holes they leave: at the end of forward a large part of the heap is free but not returned (mallinfo2),
and the step's peak RSS, reached there, counts both. `malloc_trim(0)` releases
the free pages inside the heap (madvise), not only at its top. Called before every TRIM_EVERY-th decoder
block and the last one, in forward only, for micro batches of at least MIN_POSITIONS token positions, it
lowers the peak but costs tokens/s: the pages it releases, most of them the previous step's backward
memory, fault back in (zeroed) when reused. So it is a memory option, like activation checkpointing, not a
default (docs/performance.md, "Measurements behind the code": train/heap.py). glibc's malloc only:
elsewhere (musl, macOS) nothing is done, and on the malloc the `loralab` command preloads (allocator.py:
tcmalloc or mimalloc, whose heap has no such holes, a lower peak and faster) it warns and does nothing.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..runtime.allocator import active as active_allocator
from ..runtime.allocator import malloc_trim
from .compile import decoder_blocks

TRIM_EVERY = 10  # blocks between trims: one trim before the last block alone saved half as much
# Below this many token positions per micro batch the holes are small and a trim costs more than it frees
# (measured on the demo's micro batches: docs/performance.md).
MIN_POSITIONS = 512


def trim_points(n_blocks: int, every: int = TRIM_EVERY) -> list[int]:
    """The blocks before which the heap is trimmed: every `every`-th one and the last."""
    return sorted({*range(every - 1, n_blocks, every), n_blocks - 1} - {-1})


def _positions(args, kwargs) -> int:
    """Token positions of the block's input (its hidden states: the first tensor argument)."""
    x = next((a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)), None)
    return x.shape[:-1].numel() if x is not None else 0


def _trim(module, args, kwargs) -> None:  # a forward pre-hook: returning None keeps the inputs
    # a training forward (not validation or generation) of a micro batch big enough to leave holes
    if torch.is_grad_enabled() and module.training and _positions(args, kwargs) >= MIN_POSITIONS:
        malloc_trim()(0)


def trim_heap_in_forward(model: nn.Module) -> list:
    """Register the trims on `model`'s decoder blocks; returns the hook handles (remove them to undo).
    Nothing on a model not on the CPU, without decoder blocks, or without glibc."""
    if (name := active_allocator()) != "system":
        warnings.warn(f"train.trim_heap: trims glibc's malloc, and this process runs on {name}: ignored "
                      "(LORALAB_ALLOCATOR=system runs on glibc's)", stacklevel=2)
        return []
    blocks = decoder_blocks(model)
    if malloc_trim() is None or not blocks or next(model.parameters()).device.type != "cpu":
        return []
    return [blocks[i].register_forward_pre_hook(_trim, with_kwargs=True) for i in trim_points(len(blocks))]
