"""The lean SwiGLU keeps gate and up only, computes what the model's own MLP computes bit for bit,
and leaves any other MLP alone."""
import weakref

import pytest
import torch
from torch import nn

from loralab.model.mlp import swiglu, use_lean_swiglu
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec
from loralab.peft.targets import resolve_targets
from tinymodels import alive_after_forward, saved_bytes, tiny_llama

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _lora_model(dtype, lean: bool):
    model = tiny_llama(0, attn_implementation="sdpa").to(dtype)
    model.requires_grad_(False)
    switched = use_lean_swiglu(model) if lean else 0
    torch.manual_seed(1)
    inject(model, resolve_targets(model, "all-linear"), LoraSpec(r=4, alpha=8, dropout=0.1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)  # B = 0 would hide the MLP's backward from A's gradients
    return model.train(), switched


def _saved_and_grads(model):
    torch.manual_seed(2)
    with saved_bytes(exclude=model.parameters()) as seen:
        logits = model(input_ids=IDS).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits, sum(seen.values()), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_swiglu_is_the_mlp_bit_for_bit_and_keeps_one_intermediate_less(dtype):
    (plain, _), (lean, switched) = _lora_model(dtype, False), _lora_model(dtype, True)
    assert switched == 2  # both layers of the tiny Llama
    out0, saved0, grads0 = _saved_and_grads(plain)
    out1, saved1, grads1 = _saved_and_grads(lean)
    assert torch.equal(out0, out1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    # one (tokens x intermediate) tensor per layer less: silu(gate)
    assert saved0 - saved1 == 2 * IDS.numel() * 64 * dtype.itemsize


def test_swiglu_gradients_match_autograd_on_its_own():
    g0, u0 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu, (g0.requires_grad_(), u0.requires_grad_()))


class GeluMLP(nn.Module):
    """Same parts, another function: must keep its own forward."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.GELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_an_mlp_that_is_not_swiglu_keeps_its_forward():
    outer = nn.Sequential(GeluMLP())
    rng = torch.get_rng_state()
    assert use_lean_swiglu(outer) == 0
    assert "forward" not in vars(outer[0])
    assert torch.equal(torch.get_rng_state(), rng)  # the check draws from its own generator


def _product_alive_after_forward(model, outer_hooks: bool):
    """Forward + backward; whether each layer's product h (down_proj's input) was still alive after forward
    (with outer hooks, checkpointing's kind, the product must keep h itself), the logits, the LoRA gradients."""
    refs = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    return alive_after_forward(model, IDS, refs, outer_hooks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_proj_rebuilds_the_product_in_backward_bit_for_bit(dtype):
    """Down's LoRA needs its input h = silu(gate) * up in backward; the lean MLP hands it gate and up
    (kept anyway) instead, so h is freed after forward, and the gradients are the plain MLP's exactly."""
    plain, _ = _lora_model(dtype, False)
    _, out0, grads0 = _product_alive_after_forward(plain, False)
    for outer in (False, True):
        lean, _ = _lora_model(dtype, True)
        alive, out1, grads1 = _product_alive_after_forward(lean, outer)
        assert alive == [outer, outer]
        assert torch.equal(out0, out1)
        for name in grads0:
            assert torch.equal(grads0[name], grads1[name]), (outer, name)
