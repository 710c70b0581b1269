"""The LoRA hot path's speed tricks keep their meaning: the cheap dropout mask and the bf16 path."""
import torch

from loralab.peft.lora import FastDropout, LoRALinear, LoraSpec


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
