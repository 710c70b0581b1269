"""The fused plain-LoRA layer (peft/fused.py) against the composition it replaces and against PEFT:
outputs and every gradient, with and without bias, dropout and a bf16 base; and where it must not run."""
import copy

import pytest
import torch

import loralab.peft.fused as fused
from loralab.peft.lora import LoRALinear, LoraSpec
from loralab.peft.quant import NF4Linear


def _layer(bias=True, dropout=0.0, seed=0, **spec):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(24, 40, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(40, 24, generator=g) * 0.2)
        if bias:
            base.bias.copy_(torch.randn(40, generator=g))
    base.requires_grad_(False)  # frozen, as inject leaves it
    layer = LoRALinear(base, LoraSpec(r=4, alpha=12, dropout=dropout, **spec))
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(40, 4, generator=g) * 0.3)
    return layer.train()


def _run(layer, x, seed=3):
    """Output, input gradient and factor gradients for a weighted sum of the output."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks on both paths
    y = layer(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * w).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def _calls(monkeypatch):
    seen = []
    real = fused._LoraLinearFn.apply
    monkeypatch.setattr(fused._LoraLinearFn, "apply", lambda *a: seen.append(1) or real(*a))
    return seen


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_the_composition(bias, dropout, monkeypatch):
    layer = _layer(bias, dropout)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    seen = _calls(monkeypatch)
    got = _run(layer, x)
    assert seen, "the fused function did not run"
    monkeypatch.setattr(fused, "ENABLED", False)  # the composition
    want = _run(layer, x)
    assert len(seen) == 1  # the composition did not call it
    for a, b in zip(got, want):  # fp32, the sums in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert got[2].abs().sum() > 0 and got[3].abs().sum() > 0
    if dropout:  # the mask really acted: without it the output differs
        layer.eval()
        assert not torch.allclose(layer(x), got[0], atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_forward_and_gradients_equal_peft(bias):
    from peft.tuners.lora import Linear as PeftLinear

    from peft import LoraConfig

    ours = _layer(bias)
    theirs = PeftLinear(copy.deepcopy(ours.base), "default", r=4, lora_alpha=12, lora_dropout=0.0,
                        config=LoraConfig(r=4, lora_alpha=12))
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    theirs.train()
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2))
    y, gx, ga, gb = _run(ours, x)
    xb = x.clone().requires_grad_()
    yb = theirs(xb)
    (yb * torch.randn(yb.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    torch.testing.assert_close(y, yb.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


def test_bf16_base_with_fp32_factors_matches_the_composition_and_keeps_fp32_grads(monkeypatch):
    layer = _layer(True)
    layer.base.to(torch.bfloat16)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    seen = _calls(monkeypatch)
    got = _run(layer, x)
    assert seen and got[0].dtype == torch.bfloat16
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    monkeypatch.setattr(fused, "ENABLED", False)  # the composition
    want = _run(layer, x)
    for a, b in zip(got, want):  # bf16 activations: the sums round in another order
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_no_grad_and_eval_give_the_training_output():
    layer = _layer(True)
    x = torch.randn(5, 24)
    with torch.no_grad():
        a = layer(x)
        b = layer.eval()(x)
    torch.testing.assert_close(a, b)
    update = layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(b, layer.base(x) + update, rtol=1e-5, atol=1e-6)


def _nf4_layer(bias: bool, dtype=torch.float32, dropout=0.0):
    g = torch.Generator().manual_seed(5)
    dense = torch.nn.Linear(128, 64, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(64, 128, generator=g) * 0.1)
    layer = LoRALinear(NF4Linear.from_linear(dense, compute_dtype=dtype), LoraSpec(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(64, 4, generator=g) * 0.3)
    return layer.train()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_over_an_nf4_base_equals_the_composition(bias, dropout, monkeypatch):
    """QLoRA's layers run fused too: the same output and gradients as NF4Linear + the LoRA
    composition, W dequantized in forward and backward and never kept (only x, the bool mask and t
    are saved: no weight-sized tensor)."""
    layer = _nf4_layer(bias, dropout=dropout)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    seen = _calls(monkeypatch)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = _run(layer, x)
    assert seen, "the fused function did not run over the NF4 base"
    assert (64, 128) not in saved, f"a dense weight was kept for backward: {saved}"
    monkeypatch.setattr(fused, "ENABLED", False)  # NF4Linear's own function + the composition
    want = _run(layer, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0


def test_fused_over_a_bf16_nf4_base_matches_the_composition(monkeypatch):
    layer = _nf4_layer(True, torch.bfloat16)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    seen = _calls(monkeypatch)
    got = _run(layer, x)
    assert seen and got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    monkeypatch.setattr(fused, "ENABLED", False)
    want = _run(layer, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["dora", "merged", "trained_base", "nf4_other_dtype"])
def test_other_layers_keep_their_own_path(case, monkeypatch):
    if case == "nf4_other_dtype":  # an NF4 base computing in bf16 fed fp32: NF4Linear's own cast path
        layer = LoRALinear(NF4Linear.from_linear(torch.nn.Linear(64, 64), compute_dtype=torch.bfloat16),
                           LoraSpec(r=4, alpha=8))
        x = torch.randn(2, 64)
    else:
        layer = _layer(True, use_dora=case == "dora")
        x = torch.randn(2, 24)
        if case == "merged":
            layer.merge()
        if case == "trained_base":  # full fine-tuning of the base alongside: autograd must see W
            layer.base.weight.requires_grad_(True)
    seen = _calls(monkeypatch)
    layer(x.requires_grad_()).sum().backward()
    assert not seen and x.grad.abs().sum() > 0


def test_under_autocast_the_layer_runs_unfused_and_matches_the_composition(monkeypatch):
    """A user's own bf16 autocast around fp32 weights: the fused function's matmuls would disagree on
    dtype ("self and mat2 must have the same dtype"); the layer takes the composition instead."""
    layer = _layer(True)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(4))
    seen = _calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(layer, x)
    assert not seen
    monkeypatch.setattr(fused, "ENABLED", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(layer, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
