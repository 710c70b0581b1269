"""RMSNorm that keeps its input in the compute dtype for backward, not an fp32 copy.

A Llama-style RMSNorm computes weight * (x / rms(x)) with the statistics in fp32. Autograd keeps the fp32
copy of x (read by the square and by the scaling) and the reciprocal rms: in bf16 twice the input's bytes
for each of a layer's two norms, and its backward is half a dozen elementwise passes. `_RMSNorm` keeps x
itself (the bf16 tensor) and the reciprocal rms, and forms the input gradient in closed form:

    y = w * (x r),  r = 1 / sqrt(mean(x^2) + eps)   =>   dx = r (gh - xhat mean(gh xhat)),  gh = g w,  xhat = x r

Its forward is the module's own, bit for bit; its gradients equal autograd's up to the order of float sums
(tests/model/test_norm.py). `use_lean_rmsnorm(model)` switches each norm whose forward is exactly that (checked on
a seeded input, as model/mlp.py checks SwiGLU); others (Gemma's 1 + w, LayerNorm, remote code) keep theirs.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .mlp import forward_matches
from .rebuild import mark


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Llama RMSNorm's output (its own op order, so bit for bit) and the reciprocal rms."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


REBUILT = True  # benchmarks/experiments/levers_ab.py's `keepnorm` variant turns it off: outputs kept, to compare


class _Output:
    """The norm's output computed again from what _RMSNorm keeps (its input, weight and 1/rms): the recipe
    model/rebuild.py runs in backward instead of keeping the output for its readers."""
    __slots__ = ("x", "weight", "rstd")

    def __init__(self, x, weight, rstd):
        self.x, self.weight, self.rstd = x, weight, rstd

    def __call__(self) -> torch.Tensor:
        return self.weight * (self.x.to(torch.float32) * self.rstd).to(self.x.dtype)  # _rms_norm's ops


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        # its readers' saves may keep this recipe instead of y (model/rebuild.py)
        return mark(y, _Output(x, weight, rstd)) if REBUILT else y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gh = (g * weight).to(torch.float32)
            grad_x = (rstd * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g * xhat.to(x.dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)
    return _rms_norm(x, self.weight, self.variance_epsilon)[0]


def lean_norms(model: nn.Module) -> list[nn.Module]:
    """The Llama-style RMSNorms of `model` whose own forward is exactly the lean one's (checked on a seeded input)."""
    found = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and isinstance(getattr(m, "variance_epsilon", None), float) \
                and "forward" not in vars(m) and forward_matches(m, _lean_forward, w.shape[0], w):
            found.append(m)
    return found


def use_lean_rmsnorm(model: nn.Module) -> int:
    """Switch every Llama-style RMSNorm of `model` to the lean forward (per instance); returns how many."""
    norms = lean_norms(model)
    for m in norms:
        m.forward = types.MethodType(_lean_forward, m)
    return len(norms)
