"""The LoRA hot path's speed and memory tricks keep their meaning: the cheap dropout mask, the
bit-packed dropout mask in backward, and the bf16 path."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loralab.peft.dropout import FastDropout, _pack_bits, _unpack_bits, keep_mask, low_rank, pack_mask, unpack_mask
from loralab.peft.lora import LoRALinear, LoraSpec
from tinymodels import saved_bytes


def test_fast_dropout_is_bernoulli_with_rate_p_and_unbiased():
    torch.manual_seed(0)
    d = FastDropout(0.05).train()
    x = torch.ones(400, 1000)
    y = d(x)
    kept = (y != 0).float()
    assert abs(kept.mean().item() - 0.95) < 0.002                  # rate p (n = 400k, sd ~ 0.0003)
    assert abs(y.mean().item() - 1.0) < 0.005                       # scaled by 1 / (1 - p): unbiased
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))
    # neighbours are independent: P(both dropped) ~ p^2, not p (a mask repeated across lanes)
    both = ((y[:, :-1] == 0) & (y[:, 1:] == 0)).float().mean().item()
    assert both < 0.005
    # every column and row sees drops (no stuck lanes from the 64 -> 16 bit split)
    assert (kept.mean(0) < 1).all() and (kept.mean(1) < 1).all()


def test_fast_dropout_is_seeded_and_identity_in_eval():
    d = FastDropout(0.3).train()
    x = torch.randn(7, 33)
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    b = d(x)
    assert torch.equal(a, b)
    assert not torch.equal(d(x), b)  # each mask draws afresh from torch's generator
    assert torch.equal(d.eval()(x), x)


def test_bf16_activation_path_matches_fp32_math_and_keeps_fp32_grads():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False)
    layer = LoRALinear(base, LoraSpec(r=4, alpha=8, dropout=0.0))
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(10, 64)
    ref = layer(x)  # all fp32
    layer.base.to(torch.bfloat16)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
    assert layer.lora_A.weight.grad.abs().sum() > 0


def _composition(x, p, a, b):
    """The plain autograd composition low_rank replaces: dropout module, then two matmuls."""
    return F.linear(F.linear(FastDropout(p).train()(x), a), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_equals_the_composition_bit_for_bit(dtype):
    torch.manual_seed(0)
    x0 = torch.randn(3, 37, 64).to(dtype)
    a0, b0 = torch.randn(8, 64) * 0.1, torch.randn(48, 8) * 0.1   # fp32 masters, cast as lora_update does
    grads, outs = [], []
    for fn in (low_rank, None):
        x, a, b = x0.clone().requires_grad_(), a0.clone().requires_grad_(), b0.clone().requires_grad_()
        torch.manual_seed(7)
        ac, bc = a.to(dtype), b.to(dtype)
        out = fn(FastDropout(0.3).train(), x, ac, bc) if fn else _composition(x, 0.3, ac, bc)
        out.backward(torch.randn_like(out))
        outs.append(out)
        grads.append((x.grad, a.grad, b.grad))
    assert torch.equal(outs[0], outs[1])
    for mine, ref in zip(*grads):
        assert torch.equal(mine, ref)
    assert (outs[0] != 0).any() and (grads[0][1] != 0).any()


def test_low_rank_keeps_x_once_and_masks_as_bits():
    """Three layers reading one x (q, k, v) keep x once plus three masks of a bit per element, where the
    composition keeps a float mask and a dropped input per layer: six copies of x."""
    torch.manual_seed(0)
    x = torch.randn(4, 128, 64, requires_grad=True)
    weights = [(torch.randn(8, 64, requires_grad=True), torch.randn(64, 8, requires_grad=True)) for _ in range(3)]

    def kept(fn):
        with saved_bytes(exclude=[w for pair in weights for w in pair]) as seen:
            sum(fn(x, a, b).sum() for a, b in weights)
        return sum(seen.values())

    xb = x.numel() * 4
    mine = kept(lambda x, a, b: low_rank(FastDropout(0.1).train(), x, a, b))
    ref = kept(lambda x, a, b: _composition(x, 0.1, a, b))
    assert ref >= 6 * xb
    assert mine <= xb + 3 * x.numel() // 8 + 3 * 4 * 128 * 8 * 4     # x, three masks' bits, A's outputs
    # not training, or no gradients: the module runs (identity in eval), nothing drawn
    d = FastDropout(0.5).eval()
    a, b = weights[0]
    assert torch.equal(low_rank(d, x, a, b), F.linear(F.linear(x, a), b))


@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1537), (986, 64)])
def test_packed_masks_give_back_the_mask(shape):
    torch.manual_seed(1)
    keep = keep_mask(torch.empty(shape), 0.3)
    bits = pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_mask(bits, keep.shape), keep)


@pytest.mark.parametrize("n", [1, 8, 13, 986 * 64 + 5])
def test_torch_bit_packing_off_the_cpu_matches_numpy(n):
    """CUDA masks are packed by torch ops (`_pack_bits`): run here on CPU tensors, against numpy's packbits
    and unpackbits, the CPU path and the oracle."""
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) >= 0.3
    bits = _pack_bits(keep)
    assert torch.equal(bits, torch.from_numpy(np.packbits(keep.numpy())))
    assert torch.equal(_unpack_bits(bits, n), keep)
    assert torch.equal(_unpack_bits(pack_mask(keep), n), keep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_are_kept_as_bits_with_the_same_gradients():
    """On CUDA the LoRA input's mask is kept as bits (torch ops) and backward rebuilds the same mask: the
    gradients equal the float composition's under the same draw."""
    torch.manual_seed(0)
    x = torch.randn(4, 37, 32, device="cuda", requires_grad=True)
    a = torch.randn(8, 32, device="cuda", requires_grad=True)
    b = torch.randn(16, 8, device="cuda", requires_grad=True)
    drop = FastDropout(0.25).train()
    torch.cuda.manual_seed(3)
    low_rank(drop, x, a, b).square().sum().backward()
    mine = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    torch.cuda.manual_seed(3)
    keep = keep_mask(x, 0.25)
    F.linear(F.linear(x * keep / 0.75, a), b).square().sum().backward()
    for got, want in zip(mine, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, want)
    assert pack_mask(keep).numel() == -(-keep.numel() // 8)
