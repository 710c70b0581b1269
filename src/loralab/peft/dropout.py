"""LoRA's dropout: a cheap mask on the CPU, and kept for backward as one bit per element (on every device).

    u = B A (x ⊙ m / (1 - p))      m ~ Bernoulli(1 - p), one mask per wrapped layer

Written as a plain composition (dropout module, then the two matmuls), autograd keeps for every
wrapped layer the float mask (saved by the multiply) and the dropped input (saved by A's matmul):
two activation-sized tensors per layer, six copies of x for q, k and v, which read the same x.
`low_rank` keeps x itself (one storage, whoever reads it), the mask packed to bits (`pack_mask`)
and A's r-wide output, and rebuilds the dropped input in backward with one multiply: the same values
and gradients as the composition, bit for bit (tests/peft/test_dropout.py), at a third of the saved
bytes of the LoRA inputs in fp32 (docs/memory.md).

Packed to bits, a step's masks take an eighth of their bool size: as bool they were as much as all
RMSNorm inputs at the throughput benchmark's micro batch, and packing and unpacking costs a fraction of
drawing them (docs/performance.md, "Measurements behind the code").
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask shaped like x, each element kept with probability 1 - p.

    On the CPU, drawing one random number per element dominates a LoRA step (the bernoulli kernel
    draws ~100M numbers/s; 210 LoRA inputs per step on the default model). Here each 64-bit draw is
    split into four 16-bit uniforms: the same independent Bernoulli(1 - p) mask, with p rounded to a
    multiple of 1/65536. The 64-bit draws come from numpy's PCG64DXSM, seeded by one draw of torch's
    generator (so torch.manual_seed and a checkpoint's RNG state still decide every mask): faster than
    torch's mt19937 at the LoRA inputs of the bench's micro batch (benchmarks/experiments/dropout_mask.py;
    docs/performance.md).
    Elsewhere the RNG is cheap and one uniform per element is drawn.
    """
    if x.device.type != "cpu":
        return torch.rand(x.shape, device=x.device) >= p
    n = x.numel()
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    bits = np.random.PCG64DXSM(seed).random_raw((n + 3) // 4)
    uniform16 = bits.view(np.int16)[:n]  # each uniform on [-32768, 32767]
    # compared in numpy: torch's int16 `ge` ran several times slower on the CPU (docs/performance.md)
    return torch.from_numpy(uniform16 >= round(p * 65536) - 32768).view(x.shape)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as its bits (uint8, 8 elements per byte, the first in the high bit as numpy's packbits
    orders them), for keeping over the step: numpy on the CPU, torch's elementwise ops elsewhere."""
    flat = keep.reshape(-1)
    if keep.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))
    return _pack_bits(flat)


def unpack_mask(kept: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """pack_mask's bits back as the bool mask of `shape`."""
    n = shape.numel()
    if kept.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(kept.numpy(), count=n).view(np.bool_)).view(shape)
    return _unpack_bits(kept, n).view(shape)


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)


def _pack_bits(flat: torch.Tensor) -> torch.Tensor:
    """np.packbits in torch ops, for masks off the CPU: the bools' bytes (0 or 1) times each place's
    value, summed per 8 (a CUDA mask of N elements: three elementwise passes, N / 8 bytes kept)."""
    ones = flat.view(torch.uint8)
    ones = F.pad(ones, (0, -ones.numel() % 8))
    return (ones.view(-1, 8) * _bit_values(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """np.unpackbits(bits, count=n) as bool, in torch ops."""
    return (bits[:, None] & _bit_values(bits.device)).ne(0).view(-1)[:n]


def scaled_mask(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The mask as x's dtype holds it: 1 / (1 - p) where kept, else 0 (one pass over the mask)."""
    one, zero = torch.tensor([1.0 / (1.0 - p), 0.0], dtype=dtype, device=keep.device)
    return torch.where(keep, one, zero)


class FastDropout(nn.Dropout):
    """nn.Dropout with keep_mask's cheaper draw (and torch's own kernel off the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * scaled_mask(keep_mask(x, self.p), self.p, x.dtype)


class _DroppedLowRank(torch.autograd.Function):
    """F.linear(F.linear(x * m, a), b) that saves x, the mask's bits and A's output. The backward
    matmuls are the ones autograd runs for F.linear (mm of the flattened operands, in its order),
    so the gradients are the composition's bit for bit."""

    @staticmethod
    def forward(ctx, x, keep, p, a, b):
        t = F.linear(x * scaled_mask(keep, p, x.dtype), a)
        ctx.p = p
        ctx.save_for_backward(x, pack_mask(keep), a, b, t)
        return F.linear(t, b)

    @staticmethod
    def backward(ctx, g):
        x, bits, a, b, t = ctx.saved_tensors
        keep = unpack_mask(bits, x.shape)
        g2, t2 = g.reshape(-1, g.shape[-1]), t.reshape(-1, t.shape[-1])
        grad_b = g2.t().mm(t2) if ctx.needs_input_grad[4] else None
        gt = g2.mm(b)                                         # gradient of A's output
        m = scaled_mask(keep, ctx.p, x.dtype)
        grad_a = None
        if ctx.needs_input_grad[3]:
            h2 = (x * m).reshape(-1, x.shape[-1])             # the dropped input, rebuilt
            grad_a = gt.t().mm(h2)
        grad_x = gt.mm(a).view(x.shape) * m if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a, grad_b


def low_rank(dropout: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b @ a @ dropout(x) (F.linear twice) for LoRA factors a, b in x's dtype. While training with
    gradients the mask is drawn here and kept as bits (_DroppedLowRank); otherwise the modules run."""
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    if p > 0 and dropout.training and torch.is_grad_enabled():
        return _DroppedLowRank.apply(x, keep_mask(x, p), p, a, b)
    return F.linear(F.linear(dropout(x), a), b)
