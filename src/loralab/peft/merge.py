"""Folding LoRA updates into the base weights: in place (merge / unmerge), or for good
(merge_and_unload: plain nn.Linear layers, what an HF folder export saves)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .experts import expert_modules, unload_experts
from .inject import set_submodule
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


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding base + scaling * B @ A (DoRA: that
    rescaled per row to its magnitude vector).

    Quantized bases are dequantized (never re-quantized). The new weight's dtype is `dtype` if given,
    else the base's compute dtype (its weight dtype, or a quantized layer's `compute_dtype`/output).
    """
    untied_head = False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in list(lora_modules(model)):
        base = m.base
        if m.quantized:
            w = base.dequantize()
            out_dtype = dtype or getattr(base, "compute_dtype", None) or w.dtype
        else:
            w = base.weight
            out_dtype = dtype or w.dtype
            untied_head |= m is head and _shared_weight(model, m)
        weight = w.detach().to(torch.float32, copy=True)  # fresh storage: never alias a tied/old weight
        if not m.merged:  # a merged plain base already contains the update
            weight = m.variant.merged_weight(m, weight)
        bias = getattr(base, "bias", None)
        with torch.device("meta"):  # skip the pointless random init of a layer we overwrite
            linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None)
        linear.weight = nn.Parameter(weight.to(out_dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(out_dtype, copy=True), requires_grad=False)
        set_submodule(model, name, linear)
    if untied_head and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head now has its own merged weight; keep it on save
    return unload_experts(model, dtype)  # fused expert weights: base + update, the experts module put back
