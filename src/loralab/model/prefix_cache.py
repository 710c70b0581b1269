"""First tokens that many prompts share, prefilled once: at batch 1, their keys/values cached, the
cache repeated to every row, each row's own tokens run after it (evaluation's generation).

Causal attention makes a shared prefix's states the same in every row, so this is the same
computation with fewer tokens (evaluation prompts: "Question: What is", a chat template's system
prompt). Models whose layers do not all attend fully (sliding windows, linear attention) are left
alone, here and by training's shared prefix (loralab.model.shared_prefix).
"""
from __future__ import annotations

import inspect

import torch

# Run a prefix once when that spares at least this many token rows: below it the batch-1 pass's
# skinny matmuls cost about what they save.
MIN_SHARED_ROWS = 64


def cache_kwarg(model) -> str | None:
    """The forward's name for a KV cache (transformers 5.x renamed `past_key_values` to `cache`;
    the old name warns), None when it takes none (nothing to share then)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def full_attention_only(config) -> bool:
    """Whether every layer attends to all earlier tokens through a plain key/value cache: a sliding
    window counts the gap between a prefix and a row's own tokens as distance (and a custom mask
    would hide the window), a recurrent state cannot be repeated and extended as one. A cache that
    does not say which of its layers slide is taken as one that may."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=config)
    sliding = getattr(cache, "is_sliding", None)
    return sliding is not None and not any(sliding) and not any(getattr(cache, "is_linear", ()))


def prefix_cache(model, prefix_ids: torch.Tensor):
    """The cache after running `prefix_ids` (1 x k) through `model` (a causal LM or its decoder
    body), or None where a shared prefix does not apply: no cache argument, or not every layer
    full_attention_only."""
    key = cache_kwarg(model)
    if key is None or not full_attention_only(model.config):
        return None
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=prefix_ids, use_cache=True, **{key: cache})
    return cache
