"""Folding LoRA updates into the base weights: in place (merge / unmerge), or for good
(merge_and_unload: plain nn.Linear layers, or Conv1D ones where the model had a Conv1D, what an HF
folder export saves)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .experts import expert_modules, unload_experts
from .inject import set_submodule
from .layout import dense_weight, fan_in_fan_out
from .lora import LoRALinear, lora_modules


def _shared_weight(model: nn.Module, m: LoRALinear) -> bool:
    w = getattr(m.base, "weight", None)
    return w is not None and sum(p is w for _, p in model.named_parameters(remove_duplicate=False)) > 1


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (unmerge() undoes it)."""
    for name, m in lora_modules(model):
        if _shared_weight(model, m):  # e.g. an lm_head tied to the input embeddings
            raise UserError(f"cannot merge LoRA into {name} in place: its weight is shared (tied) with another "
                            f"module; use merge_and_unload(model)")
        m.merge()
    for _, m in expert_modules(model):  # fused expert weights: their update added in place
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, m in [*lora_modules(model), *expert_modules(model)]:
        m.unmerge()
    return model


def _dense_layer(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> nn.Module:
    """A frozen layer holding `weight` (out, in) and `bias` as they are: nn.Linear, or transformers'
    Conv1D (weight stored transposed, (in, out)) so the model's state dict keeps its keys' shapes and
    transformers loads the saved folder as the architecture it is."""
    n_out, n_in = weight.shape
    with torch.device("meta"):  # skip the pointless random init of a layer we overwrite
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(n_out, n_in)
        else:
            layer = nn.Linear(n_in, n_out, bias=bias is not None)
    layer.weight = nn.Parameter(weight.t().contiguous() if conv1d else weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    elif conv1d:  # Conv1D always has a bias; a quantized stand-in without one had a zero bias
        layer.bias = nn.Parameter(torch.zeros(n_out, dtype=weight.dtype, device=weight.device), requires_grad=False)
    return layer


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by a plain layer holding base + scaling * B @ A (DoRA: that
    rescaled per row to its magnitude vector): an nn.Linear, or a Conv1D where the model had one
    (the update transposed into its (in, out) weight, as PEFT merges with fan_in_fan_out).

    Quantized bases are dequantized (never re-quantized). The new weight's dtype is `dtype` if given,
    else the base's compute dtype (its weight dtype, or a quantized layer's `compute_dtype`/output).
    """
    untied_head = False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in list(lora_modules(model)):
        base = m.base
        if m.quantized:
            out_dtype = dtype or getattr(base, "compute_dtype", None) or base.dequantize().dtype
        else:
            out_dtype = dtype or base.weight.dtype
            untied_head |= m is head and _shared_weight(model, m)
        weight = dense_weight(base)  # (out, in), fp32, fresh storage: never aliases a tied/old weight
        if not m.merged:  # a merged plain base already contains the update
            weight = m.variant.merged_weight(m, weight)
        bias = getattr(base, "bias", None)
        bias = bias.detach().to(out_dtype, copy=True) if isinstance(bias, torch.Tensor) else None
        set_submodule(model, name, _dense_layer(weight.to(out_dtype), bias, fan_in_fan_out(base)))
    if untied_head and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head now has its own merged weight; keep it on save
    return unload_experts(model, dtype)  # fused expert weights: base + update, the experts module put back
