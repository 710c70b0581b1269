"""Saves for backward that are rebuilt instead of kept: a norm's output, from what the norm keeps anyway.

A decoder layer's RMSNorm output feeds q/k/v (and gate/up): each LoRA layer keeps it for A's gradient
(one storage for all readers, peft/fused.py), while the norm itself keeps its input and 1/rms
(model/norm.py). The output is weight * (x * rstd), one elementwise pass from those, so keeping it costs
a hidden-wide tensor per norm per token (2 x H x b per layer; its share of the peak: docs/performance.md,
"Levers") for no speed: model/norm.py marks its output with how to
compute it again (`mark`), and under `rebuilt_saves(y)` every save of y (or of a view of all of it) keeps
that recipe instead; backward runs it once for all the saves made under one `rebuilt_saves`, bit for bit
the forward's values. Nothing changes inside other saved-tensor hooks (activation checkpointing, which
drops these saves anyway; a measurement's) nor while compiling.

`rebuild_attention_inputs(model)` puts every decoder layer's attention under it (its input is the first
norm's output); model/mlp.py's lean forward does the same for gate and up, and marks its product h
(rebuilt from gate and up for down_proj).
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

_RECIPE = "_loralab_rebuild"  # the attribute a marked tensor carries: a no-argument function of its values


def under_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (checkpointing's, a measurement's). torch's query is private:
    where it is missing or differs, answer yes, which only gives up the rebuild."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):
        return True


def mark(t: torch.Tensor, recipe) -> torch.Tensor:
    """t, carrying `recipe` (called without arguments under no_grad, it returns t's values again); while
    compiling t carries nothing (rebuilt_saves does nothing there, and an attribute set on a traced tensor
    would break the graph)."""
    if not torch.compiler.is_compiling():
        setattr(t, _RECIPE, recipe)
    return t


class _Rebuilt:
    """One marked tensor as its saves keep it: the recipe, run at the first unpack, its result shared."""
    __slots__ = ("recipe", "value")

    def __init__(self, recipe):
        self.recipe, self.value = recipe, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.recipe()
        return self.value


def rebuilt_saves(y: torch.Tensor | None):
    """A context under which saves of the marked tensor y keep its recipe (a no-op for anything else)."""
    recipe = getattr(y, _RECIPE, None)
    if recipe is None or torch.compiler.is_compiling() or under_saved_tensor_hooks():
        return contextlib.nullcontext()
    # y's place, not y itself: the hooks must not keep it alive
    place = (y.untyped_storage().data_ptr(), y.storage_offset(), y.numel())
    shared = _Rebuilt(recipe)

    def pack(t):
        if (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) == place and t.is_contiguous():
            return shared, t.shape
        return t

    def unpack(p):
        return p[0].get().view(p[1]) if isinstance(p, tuple) else p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _attention_forward(self, *args, **kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    with rebuilt_saves(x):
        return self._loralab_attention_forward(*args, **kwargs)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of `model` that read a decoder layer's first norm: a child `self_attn` beside an
    `input_layernorm`, not yet put under rebuilt_saves."""
    return [layer.self_attn for layer in model.modules()
            if isinstance(getattr(layer, "self_attn", None), nn.Module) and hasattr(layer, "input_layernorm")
            and "_loralab_attention_forward" not in vars(layer.self_attn)]


def rebuild_attention_inputs(model: nn.Module) -> int:
    """Run each decoder layer's attention under rebuilt_saves of its input; returns how many. Its input is
    rebuilt only where the norm marked it."""
    layers = attention_layers(model)
    for attn in layers:
        attn._loralab_attention_forward = attn.forward
        attn.forward = types.MethodType(_attention_forward, attn)
    return len(layers)
