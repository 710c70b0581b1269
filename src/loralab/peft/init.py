"""How a LoRA layer's factors start (`lora.init`), as PEFT's `init_lora_weights` does it:

  kaiming         A Kaiming-uniform, B = 0 (PEFT's default, init_lora_weights=True)
  gaussian        A ~ N(0, 1/r^2) (std 1/r), B = 0
  pissa           the top-r singular triplets of W: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T (full SVD)
  pissa_niter_N   the same from a randomized low-rank SVD with N subspace iterations (torch.svd_lowrank)
  olora           W = QR: B = Q[:, :r], A = R[:r]

with s the layer's scaling. The first two start with B = 0, so the model starts as the base. PiSSA
and OLoRA move s·B0·A0 out of the frozen weight instead (W <- W - s·B0·A0): the model still starts
as the base, but its frozen weight is no longer the original. The layer keeps A0 and B0 so the
adapter can be saved for the original base, as PEFT's conversion does (A=[A|A0], B=[B|-B0]).
On a quantized base (NF4) the weight is dequantized, split, and the residual quantized again
(what PEFT does for OLoRA on 4-bit weights; for PiSSA it is "quantize the residual"). A Conv1D's
(in, out) weight is read and written back through layout.py, so the split is of the (out, in) matrix.

The random inits draw each module's A from its own generator, seeded by (run seed, module name)
(`seed_factors`, called by inject.py), not from the global stream: drawn in sequence, a module's
start would depend on how many numbers the modules before it drew, so two runs of one seed that
differ in rank or targets would start every later module differently. Seeded by name, two such
runs start each module whose A has the same shape with the same A: what lets a study compare its
cells seed by seed (study/stats.py).
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..errors import UserError
from .layout import dense_weight, features, write_weight
from .presets import PISSA_NITER, mutates_base


def check_base(init: str, r: int, base: nn.Module, name: str) -> None:
    """Before any layer changes: can `init` start a rank-r adapter on this base layer?"""
    if not mutates_base(init):
        return
    n_in, n_out = features(base)
    if r > min(n_in, n_out):
        raise UserError(f"config key 'lora.init': {init} needs r <= min(in, out) features; {name} is "
                        f"{n_in} -> {n_out} and r is {r}")
    if not hasattr(base, "weight") or (callable(getattr(base, "dequantize", None))
                                       and not callable(getattr(base, "requantize_", None))):
        raise UserError(f"config key 'lora.init': {init} must rewrite {name}'s frozen weight, and "
                        f"{type(base).__name__} cannot be rewritten")


def dropout_warning(init: str, dropout: float) -> str | None:
    """PiSSA and OLoRA put W's principal part on the adapter path, where LoRA dropout acts, so dropout
    there perturbs the layer's main weights, not a small update (PiSSA's authors train with none).
    Measured: `loralab study variants`' pissa cell at lr 2e-4, 60 steps: val loss 0.686 with dropout
    0.05, 0.501 without (docs/studies.md)."""
    if not mutates_base(init) or not dropout:
        return None
    return (f"lora.init={init} with lora.dropout={dropout:g}: the dropout acts on the weights' principal "
            "part, which this init moved into the adapter; PiSSA and OLoRA train with lora.dropout=0")


def _principal(w: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling·B·A the top-r singular part of w (PiSSA)."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=int(PISSA_NITER.fullmatch(init)[1]))
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


@torch.no_grad()
def init_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, base: nn.Module, init: str,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fill A (r, in) and B (out, r) in place. PiSSA / OLoRA also rewrite the base weight to the
    residual and return the starting (A0, B0); the others return None."""
    r = lora_a.shape[0]
    if init == "kaiming":
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(lora_a, std=1 / r)
    if not mutates_base(init):
        nn.init.zeros_(lora_b)
        return None
    w = dense_weight(base)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r], q[:, :r]
    else:
        a, b = _principal(w, r, scaling, init)
    lora_a.copy_(a)
    lora_b.copy_(b)
    write_weight(base, w - scaling * (lora_b.float() @ lora_a.float()))
    return lora_a.detach().clone(), lora_b.detach().clone()


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one module's factors, a pure function of (run seed, full module name)."""
    digest = hashlib.sha256(f"loralab:lora-init:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def seed_factors(lora_a: torch.Tensor, init: str, seed: int, name: str) -> None:
    """Redraw A of a random init (kaiming, gaussian) from the module's own generator (module_seed);
    drawn on the CPU in fp32 so the values do not depend on the device or the factors' dtype. The
    SVD/QR inits are functions of the weight alone and are left as they are."""
    if init not in ("kaiming", "gaussian"):
        return
    g = torch.Generator().manual_seed(module_seed(seed, name))
    a = torch.empty(lora_a.shape, dtype=torch.float32)
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    else:
        nn.init.normal_(a, std=1 / a.shape[0], generator=g)
    lora_a.copy_(a)
