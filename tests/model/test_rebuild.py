"""The norms' outputs rebuilt in backward: not kept after forward, gradients bit for bit those of keeping them."""
import contextlib
import weakref

import pytest
import torch
from torch import nn

from loralab.model.mlp import use_lean_swiglu
from loralab.model.norm import use_lean_rmsnorm
from loralab.model.rebuild import mark, rebuild_attention_inputs, rebuilt_saves
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec
from loralab.peft.quant import quantize_model
from tinymodels import alive_after_forward, load_converted, tiny_llama

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _model(dtype, rebuild: bool, attn="sdpa", nf4=False):
    model = tiny_llama(0, num_hidden_layers=3, attn_implementation=attn, hidden_size=64, intermediate_size=128)
    model = model.to(dtype)
    model.requires_grad_(False)
    if nf4:  # QLoRA: the frozen linears in NF4 (blocks of 64), computing in dtype
        quantize_model(model)
    use_lean_swiglu(model)
    use_lean_rmsnorm(model)
    if rebuild:
        assert rebuild_attention_inputs(model) == 3
        assert rebuild_attention_inputs(model) == 0  # already wrapped: not twice
    torch.manual_seed(1)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model.train()


def _run(model, outer_hooks=False):
    """Forward + backward; whether each norm's output was alive after forward, the logits, the LoRA grads."""
    refs = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(out)))
    return alive_after_forward(model, IDS, refs, outer_hooks)


@pytest.mark.parametrize("attn,nf4", [("sdpa", False), ("eager", False), ("sdpa", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_outputs_are_rebuilt_in_backward_bit_for_bit(dtype, attn, nf4):
    _, out0, grads0 = _run(_model(dtype, False, attn, nf4))
    alive, out1, grads1 = _run(_model(dtype, True, attn, nf4))
    # layer 0's first norm reads the frozen embeddings (no gradient flows into it: nothing to rebuild from);
    # every other norm's output is gone after forward, its readers' saves rebuild it
    assert alive == [True] + [False] * 5
    assert torch.equal(out0, out1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def test_under_other_saved_tensor_hooks_the_outputs_are_kept():
    alive, _, grads = _run(_model(torch.float32, True), outer_hooks=True)
    assert alive == [True] * 6
    _, _, grads0 = _run(_model(torch.float32, False))
    assert all(torch.equal(grads[n], grads0[n]) for n in grads0)


def test_one_rebuild_serves_every_save_and_other_tensors_are_kept_as_they_are():
    calls = []
    x = torch.randn(4, 6, requires_grad=True)
    y = mark(x * 2, lambda: calls.append(1) or (x.detach() * 2))
    w1, w2 = torch.randn(6, 3, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    with rebuilt_saves(y):
        out = (y @ w1).sum() + (y.view(2, 12).view(4, 6) @ w2).sum() + (y[:2] @ w1).sum()
    out.backward()
    assert len(calls) == 1  # the two whole-y saves share one rebuild; y[:2] (a part) was kept itself
    torch.testing.assert_close(w1.grad, y.detach().T @ torch.ones(4, 3) + y.detach()[:2].T @ torch.ones(2, 3))
    torch.testing.assert_close(w2.grad, y.detach().T @ torch.ones(4, 5))


def test_an_unmarked_tensor_or_one_under_other_hooks_pushes_no_hooks():
    plain = torch.randn(3, 3, requires_grad=True)
    assert isinstance(rebuilt_saves(plain), contextlib.nullcontext)
    assert isinstance(rebuilt_saves(None), contextlib.nullcontext)
    marked = mark(plain * 2, lambda: plain.detach() * 2)
    assert not isinstance(rebuilt_saves(marked), contextlib.nullcontext)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert isinstance(rebuilt_saves(marked), contextlib.nullcontext)


@pytest.mark.parametrize("dtype,max_row", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_a_loaded_models_packed_row_trains_bit_for_bit_as_when_the_outputs_are_kept(
        tiny_folder, monkeypatch, dtype, max_row):
    """the converters put every attention under rebuilt_saves; a packed row (its attention in blocks: SDPA in
    fp32, the grouped eager core under checkpointing in bf16) gives the same loss and gradients either way."""
    from loralab.data.layout import collate_packed
    from loralab.model import attention as A
    from loralab.model import norm, rebuild
    from loralab.train.loss import loss_sum
    from tinymodels import random_encoded, with_lora

    monkeypatch.setattr(A, "eager_max_row", lambda: max_row)
    model = with_lora(load_converted(tiny_folder, dtype), seed=0)
    row = collate_packed(random_encoded([17, 5, 9, 3, 12], seed=5, vocab=60), pad_id=0, one_row=True)
    rebuilt, get = [], rebuild._Rebuilt.get
    monkeypatch.setattr(rebuild._Rebuilt, "get", lambda self: rebuilt.append(type(self.recipe)) or get(self))
    results, outputs = [], []
    for kept in (True, False):
        monkeypatch.setattr(norm, "REBUILT", not kept)
        rebuilt.clear()
        model.zero_grad(set_to_none=True)
        s, _ = loss_sum(model, row)
        s.backward()
        results.append((s.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        outputs.append(rebuilt.count(norm._Output))
        assert len(rebuilt) - outputs[-1] == model.config.num_hidden_layers  # each layer's product, once (model/mlp.py)
    assert model.config._attn_implementation == A.BLOCKS
    layers = model.config.num_hidden_layers  # q, k, v each ask for the first norm's output; gate, up the second's
    assert outputs == [0, 5 * layers - 3]  # but the first layer's first norm reads the frozen embeddings
    (s0, g0), (s1, g1) = results
    assert torch.equal(s0, s1) and g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
