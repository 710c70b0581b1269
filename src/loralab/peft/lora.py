"""The LoRA layer: a frozen linear layer plus a trainable low-rank update, built from a LoraSpec.

    y = base(x) + (B @ A) dropout(x) * scaling     A: r x in, B: out x r (init.py: B = 0 or PiSSA/OLoRA)
    scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

What the layer does with its factors is its variant (variants.py: plain LoRA or DoRA); how they
start is its init (init.py). With B = 0 at the start an injected model computes exactly what the
base did until it trains (PiSSA / OLoRA keep that by moving s·B0·A0 out of the frozen weight).
The base may be an nn.Linear, transformers' Conv1D (GPT-2: its weight is stored (in, out), which only
merge and the inits that read the weight care about: layout.py), or a quantized stand-in (anything
with in_features, out_features, forward and `dequantize() -> (out, in) tensor`); the LoRA factors
stay in their own dtype (fp32 by default) so small updates are not rounded away in a bf16/4-bit base.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .dropout import FastDropout
from .fused import fusable, fused_forward
from .init import init_factors
from .layout import copy_weight_, dense_weight, fan_in_fan_out, features
from .presets import check_init
from .variants import variant_for


@dataclass(frozen=True)
class LoraSpec:
    """Everything one LoRA layer needs: rank, alpha, the scaling rule, init, dropout and the
    factors' dtype. Plain data: one spec per wrapped module makes per-module rank and alpha (and
    future variants) additions, not edits of the layer."""
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False            # scale by alpha / sqrt(r) (rank-stabilized LoRA) instead of alpha / r
    use_dora: bool = False              # weight-decomposed: a trainable magnitude per output row (variants.py)
    init: str = "kaiming"               # kaiming | gaussian | pissa | pissa_niter_N | olora (init.py)
    dtype: torch.dtype = torch.float32  # of the factors (fp32 masters even over a bf16 or NF4 base)

    def __post_init__(self):
        r, alpha, dropout = self.r, self.alpha, self.dropout
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise UserError(f"config key 'lora.r' must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise UserError(f"config key 'lora.alpha' must be > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise UserError(f"config key 'lora.dropout' must be in [0, 1), got {dropout!r}")
        check_init(self.init)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def is_quantized(m: nn.Module) -> bool:
    """A quantized stand-in for nn.Linear (e.g. quant.NF4Linear): it can give its dense weight."""
    return callable(getattr(m, "dequantize", None)) and hasattr(m, "in_features") and hasattr(m, "out_features")


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus the trainable rank-r update its LoraSpec describes."""

    is_lora_layer = True  # lora_disabled switches it off

    def __init__(self, base: nn.Module, spec: LoraSpec):
        super().__init__()
        self.base = base
        self.spec = spec
        self.in_features, self.out_features = features(base)
        self.quantized = is_quantized(base)
        self.fan_in_fan_out = fan_in_fan_out(base)  # saved as PEFT's flag of the same name
        anchor = next(iter(list(base.parameters()) + list(base.buffers())), None)
        device = anchor.device if anchor is not None else None
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, device=device, dtype=spec.dtype)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, device=device, dtype=spec.dtype)
        self.lora_dropout = FastDropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.merged = False
        start = init_factors(self.lora_A.weight, self.lora_B.weight, base, spec.init, spec.scaling)
        if start is not None:  # PiSSA / OLoRA: kept to save the adapter for the original base
            self.register_buffer("lora_A0", start[0], persistent=False)
            self.register_buffer("lora_B0", start[1], persistent=False)
        self.variant = variant_for(spec)
        self.variant.init(self)

    # Read-only views of the spec: the spec is the one source of truth.
    r = property(lambda self: self.spec.r)
    alpha = property(lambda self: self.spec.alpha)
    scaling = property(lambda self: self.spec.scaling)
    lora_dtype = property(lambda self: self.spec.dtype)

    # Deliberately no `weight` attribute: code doing F.linear(x, m.weight) would silently skip LoRA.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if fusable(self, x):  # plain LoRA over a frozen nn.Linear: one function, no extra activations
            return fused_forward(self, x)
        y = self.base(x)
        # Dropout acts on the LoRA input only, so the frozen path is deterministic.
        return self.variant.forward(self, x, y)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into base.weight in place (fp32 math, cast back; a Conv1D's (in, out)
        weight gets the update transposed). Idempotent."""
        if self.quantized:
            raise UserError("cannot merge LoRA into a quantized layer in place; use merge_and_unload(model), "
                            "which writes a dequantized weight")
        if not self.merged:
            copy_weight_(self.base, self.variant.merged_weight(self, dense_weight(self.base)))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact in fp32; within rounding for bf16 bases). Idempotent."""
        if self.merged:
            copy_weight_(self.base, self.variant.unmerged_weight(self, dense_weight(self.base)))
            self.merged = False

    def extra_repr(self) -> str:
        rs = ", rslora" if self.spec.use_rslora else ""
        init = "" if self.spec.init == "kaiming" else f", init={self.spec.init}"
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{rs}, variant={self.variant.name}"
                f"{init}, merged={self.merged}")


def lora_modules(model: nn.Module):
    """(full name, module) for every LoRALinear, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


@contextmanager
def zero_updates_skipped(model: nn.Module):
    """For the duration, LoRA layers whose update is exactly zero (plain LoRA with B = 0, as every
    run starts) return their base layer's output without the two low-rank matmuls, the scale and
    the add: the same values (base + 0), in less time for the base model's evaluation before training
    (docs/performance.md, "Measurements behind the code"). For no-grad use:
    a skipped layer gets no gradient. DoRA layers always run (their row norms rescale even at B = 0)."""
    skipped = [m for _, m in lora_modules(model)
               if not m.merged and m.variant.name == "lora" and not bool(m.lora_B.weight.any())]
    for m in skipped:
        m.merged = True  # a zero update is trivially folded in: forward returns base(x)
    try:
        yield
    finally:
        for m in skipped:
            m.merged = False


@contextmanager
def lora_disabled(model: nn.Module):
    """For the duration, every LoRA layer (LoRALinear, and expert LoRA: anything marking itself
    `is_lora_layer`) computes its base layer alone: the model is its base again, with no copy of a
    weight. DPO's reference model is exactly this. A merged layer cannot be switched off (its base
    weight holds the update): a ValueError."""
    layers = [m for m in model.modules() if getattr(m, "is_lora_layer", False)]
    if any(m.merged for m in layers):
        raise ValueError("lora_disabled: a LoRA layer is merged into its base; unmerge it first")
    for m in layers:
        m.merged = True  # forward returns base(x)
    try:
        yield
    finally:
        for m in layers:
            m.merged = False
