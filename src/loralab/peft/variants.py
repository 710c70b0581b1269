"""What a LoRA layer computes with its factors: the plain low-rank update, or DoRA's
weight-decomposed one. Small strategy objects beside the layer (PEFT's LoraVariant idea), so
LoRALinear does not grow a branch per variant: each gives init, forward and the merged weight.

Plain LoRA:  y = W x + b + s·B A d(x)                        (d: dropout on the LoRA input)
DoRA:        y = g ⊙ (W x + s·B A d(x)) + b,  g = m / ||W + s·B A||_row
             m: one trainable magnitude per output row (PEFT's `lora_magnitude_vector`), started
             at ||W||_row; the row norm is treated as a constant in backward (the DoRA paper's
             section 4.3, as PEFT does), so it is computed without grad.

The row norm without materialising W + s·B A (out x in) each step:
    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2s <W_i, (BA)_i> + s^2 ||(BA)_i||^2
    <W_i, (BA)_i> = (B ⊙ (A W^T)^T)_i summed,   ||(BA)_i||^2 = ((B (A A^T)) ⊙ B)_i summed
||W_i||^2 is cached once (W is frozen); A W^T is the base layer applied to the r rows of A, an
r-token matmul (the dequantizing one for an NF4 base), next to the batch's thousands of tokens.
W here is always (out, in): a Conv1D base (weight stored (in, out)) is read through layout.py, and
applying the base to A's rows gives A W^T whatever the layout.

Dropout: PEFT applies DoRA's dropout to the input of the magnitude-scaled base term too, which
costs a second full-size matmul per layer in training. Here dropout acts on the low-rank path
only, as in plain LoRA: identical in eval, merge and the saved adapter, and in training without
dropout (tested against PEFT); with dropout the regularisation differs slightly.
"""
from __future__ import annotations

import torch
from torch import nn

from .dropout import low_rank
from .layout import dense_weight


def lora_update(layer, x: torch.Tensor) -> torch.Tensor:
    """s·B A d(x) in x's dtype. A bf16 activation meets fp32 factors: the two small factors are
    cast to the activation's dtype rather than the large activation to fp32; they stay fp32
    masters, their gradients flow back through the cast in fp32."""
    if x.dtype == layer.lora_dtype:
        return low_rank(layer.lora_dropout, x, layer.lora_A.weight, layer.lora_B.weight) * layer.scaling
    a = layer.lora_A.weight.to(x.dtype)
    b = (layer.lora_B.weight * layer.scaling).to(x.dtype)
    return low_rank(layer.lora_dropout, x, a, b)


class PlainLora:
    """y = base(x) + s·B A d(x)."""
    name = "lora"

    @staticmethod
    def init(layer) -> None:
        pass

    @staticmethod
    def forward(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dtype == layer.lora_dtype:  # one fused scale-and-add
            u = low_rank(layer.lora_dropout, x, layer.lora_A.weight, layer.lora_B.weight)
            return torch.add(y, u.to(y.dtype), alpha=layer.scaling)
        return y + lora_update(layer, x).to(y.dtype)

    @staticmethod
    def merged_weight(layer, w: torch.Tensor) -> torch.Tensor:
        """The dense weight (fp32) with the update folded in."""
        return w + layer.delta_weight().to(w.device)

    @staticmethod
    def unmerged_weight(layer, w: torch.Tensor) -> torch.Tensor:
        return w - layer.delta_weight().to(w.device)


def _base_dtype(layer) -> torch.dtype:
    base = layer.base
    return getattr(base, "compute_dtype", None) or base.weight.dtype


def _bias(layer):
    b = getattr(layer.base, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


@torch.no_grad()
def dense_base_weight(layer) -> torch.Tensor:
    """The frozen weight (out, in) in fp32 (dequantized for a quantized base, transposed for a Conv1D)."""
    return dense_weight(layer.base)


class Dora(PlainLora):
    """Weight-decomposed LoRA: a magnitude per output row times the direction of W + s·B A."""
    name = "dora"

    @staticmethod
    @torch.no_grad()
    def init(layer) -> None:
        w = dense_base_weight(layer)
        layer.register_buffer("lora_weight_sq_norm", w.pow(2).sum(dim=1), persistent=False)
        layer.lora_magnitude_vector = nn.Parameter(Dora.weight_norm(layer).to(layer.lora_dtype))

    @staticmethod
    @torch.no_grad()
    def weight_norm(layer) -> torch.Tensor:
        """||W + s·B A|| per output row, fp32, from the cached ||W||^2 and r-sized products."""
        a, b, s = layer.lora_A.weight.float(), layer.lora_B.weight.float(), layer.scaling
        aw = layer.base(a.to(_base_dtype(layer)))  # A W^T (+ bias): the base applied to A's r rows
        bias = _bias(layer)
        aw = (aw if bias is None else aw - bias).float()
        # 2s <W_i, (BA)_i> + s^2 ||(BA)_i||^2 = sum_k B_ik (2s A W^T + s^2 (A A^T) B^T)_ki
        terms = torch.addmm(aw, a @ a.t(), b.t(), beta=2 * s, alpha=s * s)
        sq = (b * terms.t()).sum(dim=1) + layer.lora_weight_sq_norm
        return sq.clamp_min(0).sqrt().clamp_min(1e-12)

    @staticmethod
    def cached_weight_norm(layer) -> torch.Tensor:
        """weight_norm, kept between forwards in eval mode until A or B change (their version
        counters move with every in-place update): generation runs one forward per new token."""
        if layer.training:
            return Dora.weight_norm(layer)
        key = (layer.lora_A.weight._version, layer.lora_B.weight._version, layer.lora_A.weight.data_ptr(),
               layer.lora_B.weight.data_ptr(), layer.scaling)
        if getattr(layer, "_norm_key", None) != key:
            layer._norm_key, layer._norm = key, Dora.weight_norm(layer)
        return layer._norm

    @staticmethod
    def forward(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = layer.lora_magnitude_vector / Dora.cached_weight_norm(layer)   # (out,), grad to m only
        bias = _bias(layer)
        t = (y if bias is None else y - bias) + lora_update(layer, x).to(y.dtype)  # W x + s·B A d(x)
        # g ⊙ t as t + (g - 1) ⊙ t: g is ~1, and g - 1 keeps its digits in a bf16 activation.
        return torch.addcmul(t if bias is None else t + bias, t, (g - 1).to(t.dtype))

    @staticmethod
    def merged_weight(layer, w: torch.Tensor) -> torch.Tensor:
        """m / ||W + ΔW|| ⊙ (W + ΔW); the norm is kept so unmerge can divide it out again."""
        v = w + layer.delta_weight().to(w.device)
        norm = torch.linalg.norm(v, dim=1).clamp_min(1e-12)
        layer._merged_norm = norm
        return (layer.lora_magnitude_vector.detach().float() / norm)[:, None] * v

    @staticmethod
    def unmerged_weight(layer, w: torch.Tensor) -> torch.Tensor:
        g = layer.lora_magnitude_vector.detach().float() / layer._merged_norm
        return w / g[:, None] - layer.delta_weight().to(w.device)


def variant_for(spec) -> type[PlainLora]:
    return Dora if spec.use_dora else PlainLora
