"""Plain LoRA over a frozen dense nn.Linear as one autograd function: the low-rank update is added
into the base's output, and its input gradient into the base's, by in-place matmul-accumulate.

    y = x W^T + b + s (d(x) A^T) B^T            (d: dropout on the LoRA input; s: scaling)

Written as a composition (base layer, LoRA's two matmuls, an add), each LoRA layer allocates two
activation-sized tensors more per step (B's output in forward, the scaled output gradient in
backward), adds them in separate passes, and runs B's r-wide matmul into a fresh out-sized
buffer, which the CPU's BLAS does several times slower than accumulating onto an existing one.
Fused, the step is faster and its peak lower (benchmarks/experiments/levers_ab.py --variants stock,unfused;
docs/performance.md, "Measurements behind the code").
Here:

    forward   y = addmm(b, x, W^T);  t = d(x) A^T;  y += s t B^T                 (in place)
    backward  g_t = s g B;  grad_B = s g^T t;  grad_A = g_t^T d(x);  grad_x = g W + d'(g_t A)

saving x (one storage, as the base already does), the dropout mask as bits (dropout.pack_mask) and
the r-wide t.
The same values as the composition up to the order of the float sums (tests/peft/test_fused.py
compares it with the composition and with PEFT). It runs for plain-LoRA layers whose base is an
nn.Linear or a GPT-2 Conv1D (its (in, out) weight enters as a transposed view, no copy) with frozen
weight and bias in x's dtype (fp32 factors over a bf16 base enter cast, as
variants.lora_update casts them), or QLoRA's NF4Linear computing in x's dtype: there W is
dequantized in forward and again in backward, as NF4Linear does alone, and only the 4-bit weight
is kept. DoRA's layers and a trained base keep their path.
"""
from __future__ import annotations

import torch
from torch import nn

from .dropout import keep_mask, pack_mask, unpack_mask
from .layout import is_conv1d
from .quant import NF4Linear, dequantize_nf4
from .variants import PlainLora

ENABLED = True  # benchmarks/experiments/levers_ab.py's `unfused` variant turns it off to compare


def _dense(weight, dtype: torch.dtype, nf4_kernel: str | None) -> torch.Tensor:
    """The base weight as a dense matrix: itself, or an NF4Tensor dequantized (a fresh copy)."""
    return weight if nf4_kernel is None else dequantize_nf4(weight, dtype, nf4_kernel)


def _kept(keep: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Dropout's bool mask as 0 / 1 in x's dtype and shape. Read as bytes, the conversion is one cheap
    pass; torch.where(keep, 1/(1-p), 0) over a bool tensor ran several times slower on the CPU
    (docs/performance.md), once in forward and again in backward, for every LoRA layer."""
    return keep.reshape(x2.shape).view(torch.uint8).to(x2.dtype)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, keep, p: float, nf4_kernel: str | None):
        # nf4_kernel: None for a dense weight; else `weight` is an NF4Tensor, dequantized by that kernel
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dense = _dense(weight, x.dtype, nf4_kernel)
        y = torch.addmm(bias, x2, dense.t()) if bias is not None else x2.mm(dense.t())
        del dense  # an NF4 weight's dense copy lives one matmul long
        if keep is None:
            t = x2.mm(a.t())
        else:  # the 1/(1-p) of inverted dropout goes on the r-wide t, not on the input (see _kept)
            t = (x2 * _kept(keep, x2)).mm(a.t()).mul_(1.0 / (1.0 - p))
        y.addmm_(t, b.t(), alpha=scaling)
        ctx.scaling, ctx.p, ctx.nf4_kernel = scaling, p, nf4_kernel
        bits = None if keep is None else pack_mask(keep)
        if nf4_kernel is None:
            ctx.save_for_backward(x2, bits, weight, a, b, t)
        else:  # a frozen buffer, never in the graph (as NF4Linear's own function keeps it)
            ctx.nf4_weight = weight
            ctx.save_for_backward(x2, bits, None, a, b, t)
        ctx.in_shape = shape
        return y  # 2-D: the caller takes the view, so models may change it in place (OLMo's clip_qkv)

    @staticmethod
    def backward(ctx, g):
        x2, bits, weight, a, b, t = ctx.saved_tensors
        keep = None if bits is None else unpack_mask(bits, x2.shape)
        weight = weight if ctx.nf4_kernel is None else ctx.nf4_weight
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])
        mask = None if keep is None else _kept(keep, x2)
        grad_b = g2.t().mm(t).mul_(s) if ctx.needs_input_grad[4] else None
        # gradient of t = d(x) A^T, with dropout's 1/(1-p) folded in: d(x) = (x * mask) / (1-p)
        gt = g2.mm(b).mul_(s if keep is None else s / (1.0 - ctx.p))
        grad_a = None
        if ctx.needs_input_grad[3]:
            grad_a = gt.t().mm(x2 if mask is None else x2 * mask)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(_dense(weight, g2.dtype, ctx.nf4_kernel))
            if mask is None:
                grad_x.addmm_(gt, a)
            else:
                grad_x.add_(gt.mm(a).mul_(mask))
            grad_x = grad_x.view(ctx.in_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def fusable(layer, x: torch.Tensor) -> bool:
    """Whether `layer` (a LoRALinear) may run as one fused function on x: plain LoRA exactly (DoRA
    subclasses it), over a frozen dense (Linear or Conv1D) or NF4 base computing in x's dtype."""
    base = layer.base
    # Under autocast the function's matmuls would each pick their own dtype (bf16 for some, fp32 for the
    # others); the unfused path lets autocast cast every op consistently.
    if not ENABLED or layer.variant is not PlainLora or torch.is_autocast_enabled(x.device.type):
        return False
    if type(base) is nn.Linear or is_conv1d(base):
        dtype = base.weight.dtype
        if base.weight.requires_grad:
            return False
    elif type(base) is NF4Linear:
        dtype = base.compute_dtype
    else:
        return False
    return x.dtype == dtype and (base.bias is None or (not base.bias.requires_grad and base.bias.dtype == dtype))


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output, base plus update, through _LoraLinearFn (fusable(layer, x) holds)."""
    drop = layer.lora_dropout
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    keep = keep_mask(x, p) if p > 0 and drop.training else None
    a, b, scaling = layer.lora_A.weight, layer.lora_B.weight, float(layer.scaling)
    if a.dtype != x.dtype:  # fp32 factors over a bf16 base: cast the small factors, as variants.lora_update
        a, b, scaling = a.to(x.dtype), (b * scaling).to(x.dtype), 1.0
    kernel = layer.base.kernel if type(layer.base) is NF4Linear else None
    weight = layer.base.weight
    if is_conv1d(layer.base):  # stored (in, out): its transpose is the (out, in) view the function reads
        weight = weight.t()
    y = _LoraLinearFn.apply(x, weight, layer.base.bias, a, b, scaling, keep, p, kernel)
    return y.view(*x.shape[:-1], y.shape[-1])
