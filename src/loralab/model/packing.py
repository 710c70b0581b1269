"""The model's half of packing: feeding a packed batch (loralab.data.layout) to a model, and the
one-time check that the model honours it.

A packed batch has `position_ids` that restart at 0 for each example. Passed with no 2D attention
mask, transformers (Llama, Qwen2, Mistral, ... via `masking_utils`) detects the restarts and builds
the block-diagonal causal mask for eager and SDPA attention, so examples sharing a row never see
each other. A model that ignores them would let examples mix: the `packed_rows` converter's probe
(model/convert.py, model/probe.py) finds out on a tiny twin before a run packs.
A CPU 'auto' model gets a micro batch's rows end to end in one row instead, and its attention
computes them as blocks (model.attention.BLOCKS); the check then runs that attention.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def packed_inputs(batch: dict) -> dict:
    """Keyword arguments for the model: a packed batch passes position_ids and no 2D mask (the
    model derives the block-diagonal causal mask); a plain batch passes its attention_mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@contextmanager
def positions_into(module: torch.nn.Module, position_ids: torch.Tensor):
    """While active, every call of `module` gets these position_ids and no 2D attention mask
    (the loss calls the decoder body and the whole model in several ways; this reaches them all)."""
    def hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows, cols = ids.shape if ids is not None else position_ids.shape
        kwargs["position_ids"] = position_ids[:rows, :cols]  # a caller may run a prefix of the rows or positions
        kwargs["attention_mask"] = None
        return args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
