"""SwiGLU that keeps two of its three intermediates for backward.

A Llama-style MLP computes down(silu(gate(x)) * up(x)). Autograd keeps gate(x) (for SiLU's
backward), silu(gate(x)) and up(x) (for the product's): three intermediate-wide tensors per layer,
the widest activations of a LoRA step. `swiglu` keeps gate(x) and up(x) and recomputes the SiLU in
backward (one elementwise pass over what the product's backward reads anyway); its values and
gradients are the composition's bit for bit (aten's own silu_backward).

down_proj's LoRA needs the product h = silu(gate) * up in backward too (A's gradient), so the lean
forward marks h with how to compute it again from gate and up, and backward rebuilds it
(`_down_of_product`, model/rebuild.py): bit for bit, with one intermediate-wide tensor less per layer kept
over the step, at the same step time (docs/performance.md, "Levers").

`use_lean_swiglu(model)` gives each MLP whose forward is that composition the lean forward. Which
ones are is checked, not assumed from names: the module must have gate_proj, up_proj, down_proj and
act_fn, and its own forward must return exactly the lean one's on a small seeded input; any other
MLP (GELU, a fused gate_up_proj, a remote-code variant) keeps its forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .rebuild import mark, rebuilt_saves

PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = g * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only gate and up for backward."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class _Product:
    """The product h = silu(gate) * up computed again from gate and up, which the SwiGLU keeps anyway: the
    recipe model/rebuild.py runs in backward instead of keeping h for down_proj's LoRA."""
    __slots__ = ("gate", "up")

    def __init__(self, gate, up):
        self.gate, self.up = gate, up

    def __call__(self) -> torch.Tensor:
        return F.silu(self.gate) * self.up  # swiglu's forward: the same values bit for bit


def _down_of_product(down: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up), where whatever down keeps of its input h for backward (LoRA's A needs it)
    is rebuilt from gate and up (model/rebuild.py): one intermediate-wide tensor per layer less, for one
    SiLU and one product more in backward."""
    h = swiglu(gate, up)
    if h.requires_grad:
        mark(h, _Product(gate, up))
    with rebuilt_saves(h):
        return down(h)


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    with rebuilt_saves(x):  # x, the norm's output, rebuilt in backward rather than kept (model/rebuild.py)
        gate, up = self.gate_proj(x), self.up_proj(x)
    return _down_of_product(self.down_proj, gate, up)


@torch.no_grad()
def forward_matches(m: nn.Module, lean_forward, width: int, like: torch.Tensor) -> bool:
    """Whether m's own forward returns exactly lean_forward(m, x) on a small seeded input of `width`
    features in `like`'s dtype and device (also model/norm.py's check)."""
    g = torch.Generator(device=like.device).manual_seed(0)  # not the global RNG: training's draws stay as they were
    x = torch.randn(2, 3, width, generator=g, device=like.device).to(like.dtype)
    try:
        return torch.equal(m(x), lean_forward(m, x))
    except Exception:  # noqa: BLE001 - a module whose forward takes other inputs is simply not switched
        return False


def lean_mlps(model: nn.Module) -> list[nn.Module]:
    """The SwiGLU MLPs of `model` whose own forward is exactly the lean one's (checked on a seeded input)."""
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in PARTS) and isinstance(getattr(m.gate_proj, "weight", None), torch.Tensor)
            and "forward" not in vars(m)
            and forward_matches(m, _lean_forward, m.gate_proj.in_features, m.gate_proj.weight)]


def use_lean_swiglu(model: nn.Module) -> int:
    """Switch every SwiGLU MLP of `model` to the lean forward (per instance); returns how many."""
    mlps = lean_mlps(model)
    for m in mlps:
        m.forward = types.MethodType(_lean_forward, m)
    return len(mlps)
