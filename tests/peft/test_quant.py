"""NF4 (QLoRA) base weights: levels, error, storage, gradients through LoRA, whole-model quantization."""
import copy
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from loralab.errors import UserError
from loralab.peft.inject import count_parameters, inject
from loralab.peft.lora import LoRALinear, LoraSpec
from loralab.peft.merge import merge_and_unload
from loralab.peft.quant import (
    NF4_LEVELS,
    NF4Linear,
    bits_per_weight,
    quantization_error,
    quantize_model,
    quantized_bytes,
    scaler_block_size,
)
from tinymodels import tiny_llama

PAPER_LEVELS = [-1, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0]


def _linear(out_f, in_f, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def test_nf4_levels_are_the_papers():
    assert len(NF4_LEVELS) == 16
    assert list(NF4_LEVELS) == PAPER_LEVELS
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    levels = torch.tensor(PAPER_LEVELS)
    # torchao hard-codes the table rounded to 4 decimals; the tensors we build carry the exact one.
    assert torch.allclose(to_nf4(torch.randn(256, 64)).nf4, levels, atol=1e-4, rtol=0)
    ours = NF4Linear.from_linear(_linear(64, 64)).weight.nf4
    assert torch.allclose(ours, levels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(64, 64), (576, 576), (1536, 576), (32, 320)])
def test_quantization_error_on_gaussian_weights(shape):
    torch.manual_seed(1)
    err = quantization_error(torch.randn(shape) * 0.02)
    assert 0.05 < err <= 0.1  # 4 bits: never exact, never worse than QLoRA's ~0.09


def test_dequantize_is_close_and_frozen():
    lin = _linear(128, 64)
    q = NF4Linear.from_linear(lin, torch.bfloat16)
    w = q.dequantize()
    assert w.shape == (128, 64) and w.dtype == torch.bfloat16
    assert ((w.float() - lin.weight).norm() / lin.weight.norm()).item() < 0.1
    assert q.bias.dtype == torch.bfloat16 and not q.bias.requires_grad
    assert not q.weight.requires_grad and not any(p.requires_grad for p in q.parameters())
    assert q.in_features == 64 and q.out_features == 128


def test_bits_per_weight_and_bytes():
    q = NF4Linear.from_linear(_linear(576, 576))
    assert scaler_block_size(576 * 576) == 216  # 5184 blocks: 256 does not divide it
    assert 4.1 < bits_per_weight(q) < 4.2
    model = nn.Sequential(q, NF4Linear.from_linear(_linear(1536, 576)))
    expected = (576 * 576 * bits_per_weight(q) + 1536 * 576 * bits_per_weight(model[1])) / 8
    assert quantized_bytes(model) == pytest.approx(expected)
    assert quantized_bytes(model) < (576 * 576 + 1536 * 576) * 2 / 3.8  # vs bf16


def test_forward_matches_dense_dequantized_and_dtypes():
    lin = _linear(96, 64)
    q = NF4Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    dense = nn.functional.linear(x, q.dequantize(), lin.bias)
    assert torch.allclose(q(x), dense, atol=1e-5)
    # Activations may arrive in another dtype (e.g. fp32 decoding of a bf16 model).
    qb = NF4Linear.from_linear(lin, torch.bfloat16)
    assert qb(x.bfloat16()).dtype == torch.bfloat16 and qb(x).dtype == torch.float32


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    (layer(x) ** 2).sum().backward()
    return [layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone(), x.grad.clone()]


def test_gradients_equal_dense_dequantized_base_and_survive_no_grad_eval():
    base = _linear(48, 64)
    q = NF4Linear.from_linear(base)
    dense = nn.Linear(64, 48)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize())
        dense.bias.copy_(base.bias)
    dense.requires_grad_(False)
    lq, ld = LoRALinear(q, LoraSpec(r=4, alpha=8, dropout=0.0)), LoRALinear(dense, LoraSpec(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(3)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1  # B nonzero: A gets a gradient too
    with torch.no_grad():
        for lora in (lq, ld):
            lora.lora_A.weight.copy_(a)
            lora.lora_B.weight.copy_(b)
    x = torch.randn(3, 7, 64)
    gq, gd = _grads(lq, x), _grads(ld, x)
    for a, b in zip(gq, gd):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert q.weight.grad is None
    # The bitsandbytes trap: an inference-mode forward must not change later gradients.
    lq.eval()
    with torch.no_grad():
        lq(x)
    lq.train()
    for a, b in zip(_grads(lq, x), gq):
        assert torch.equal(a, b)


def test_gradient_reaches_lora_below_a_quantized_layer():
    # LoRA on layer 1, NF4 layer 2 above it: layer 1's factors only train if NF4 passes grad to x.
    l1 = LoRALinear(NF4Linear.from_linear(_linear(64, 64, seed=1)), LoraSpec(r=2, alpha=4, dropout=0.0))
    l2 = NF4Linear.from_linear(_linear(64, 64, seed=2))
    with torch.no_grad():
        l1.lora_B.weight.normal_()
    l2(l1(torch.randn(4, 64))).sum().backward()
    assert l1.lora_A.weight.grad.abs().sum() > 0 and l1.lora_B.weight.grad.abs().sum() > 0


def _llama():
    return tiny_llama(0, hidden_size=64, intermediate_size=128)


def test_quantize_model_tiny_llama():
    dense = _llama()
    model = copy.deepcopy(dense)
    n = quantize_model(model)
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, NF4Linear)
    assert not any(isinstance(m, nn.Linear) for name, m in model.named_modules() if name != "lm_head")
    for m in model.modules():
        if isinstance(m, NF4Linear):
            assert not m.weight.requires_grad and m.compute_dtype == torch.float32
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        ref, got = dense(ids).logits, model(ids).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.15
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    # LoRA goes on top afterwards; only its factors train and the count stays logical.
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in dense.parameters()) + trainable
    merged = merge_and_unload(model)  # B = 0: the merged model computes the quantized one
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, got, atol=1e-4)


def test_quantize_model_bf16_names_and_moves():
    model = _llama().to(torch.bfloat16)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert quantize_model(model, names) == 2
    assert quantize_model(model, names) == 0  # already quantized
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and q.compute_dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    before = q.dequantize().float()
    model.to(torch.float32)  # must not dequantize the NF4 buffer
    assert type(q.weight).__name__ == "NF4Tensor" and q.compute_dtype == torch.float32
    assert torch.allclose(q.dequantize(), before, atol=1e-2)
    ids = torch.randint(3, 128, (1, 6))
    assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(UserError, match="lm_heads"):
        quantize_model(model, ["lm_heads"])


def test_deepcopy_keeps_codes():
    q = NF4Linear.from_linear(_linear(576, 576))  # 5184 blocks: torchao's clone would fail here
    c = copy.deepcopy(q)
    assert torch.equal(c.dequantize(), q.dequantize())
    assert c.weight.quantized_data.data_ptr() != q.weight.quantized_data.data_ptr()


def test_bad_block_count_names_module_and_leaves_model_untouched():
    model = nn.Sequential(OrderedDict(proj=nn.Linear(64, 64), odd=nn.Linear(10, 10)))
    with pytest.raises(UserError, match=r"odd.*64"):
        quantize_model(model)
    assert type(model.proj) is nn.Linear


def test_quantize_after_lora_refused():
    model = _llama()
    inject(model, "qv", LoraSpec(r=2, alpha=4, dropout=0.0))
    with pytest.raises(UserError, match="before"):
        quantize_model(model)


def test_missing_torchao_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.quantize_.workflows.nf4", None)
    with pytest.raises(UserError, match=r"needs torchao: pip install 'loralab\[qlora\]'"):
        NF4Linear.from_linear(_linear(64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_follows_weight():
    q = NF4Linear.from_linear(_linear(128, 64).cuda(), torch.bfloat16)
    assert q.weight.quantized_data.device.type == "cuda" and q.dequantize().device.type == "cuda"
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.device.type == "cuda"
    q.cpu()
    assert q.weight.quantized_data.device.type == "cpu" and q.weight.nf4.device.type == "cpu"
    assert q(x.detach().cpu()).device.type == "cpu"


def test_adapter_trained_on_nf4_saves_as_peft_reloads_and_merges_exactly(tmp_path):
    """Train LoRA on an NF4 base, save it in PEFT's format, load it back (our loader on a fresh NF4
    base; PEFT on a dense model holding the dequantized weights), and merge it: every path gives
    the adapter model's logits, and the merged weights are dequantized base + scaled B.A in fp32."""
    from loralab.peft.adapters import load_adapter, save_adapter
    from peft import PeftModel

    dense = _llama()
    model = copy.deepcopy(dense)
    quantize_model(model)
    names = inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny")

    again = copy.deepcopy(dense)
    quantize_model(again)
    load_adapter(again, tmp_path / "ad")
    deq = copy.deepcopy(dense)
    with torch.no_grad():
        for name, m in again.named_modules():
            if isinstance(m, NF4Linear):
                deq.get_submodule(name.removesuffix(".base")).weight.copy_(m.dequantize())
        expected = {n: deq.get_submodule(n).weight + 2.0 * model.get_submodule(n).lora_B.weight
                    @ model.get_submodule(n).lora_A.weight for n in names}  # alpha / r = 2
        assert (again.eval()(ids).logits - want).abs().max() <= 1e-5
        assert (PeftModel.from_pretrained(deq, tmp_path / "ad").eval()(ids).logits - want).abs().max() <= 1e-4

        merged = merge_and_unload(model)
        for n in names:
            w = merged.get_submodule(n).weight
            assert type(merged.get_submodule(n)) is nn.Linear and w.dtype == torch.float32  # not re-quantized
            torch.testing.assert_close(w, expected[n], rtol=1e-5, atol=1e-6)
        assert (merged(ids).logits - want).abs().max() <= 1e-4


def _kernel_or_skip(kernel):
    from loralab.peft import quant

    if kernel == "bitsandbytes" and quant._bitsandbytes_op() is None:
        pytest.skip("bitsandbytes is not installed (the qlora extra)")
    return kernel


@pytest.mark.parametrize("kernel", ["torch", "bitsandbytes", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (32, 320)])
def test_fast_dequantization_equals_torchaos(shape, dtype, kernel):
    from loralab.peft.quant import dequantize_nf4, to_nf4

    torch.manual_seed(4)
    t = to_nf4(torch.randn(shape) * 0.02)  # double-quantized scales in groups of 216, 256, 160
    ours = dequantize_nf4(t, dtype, _kernel_or_skip(kernel))
    assert ours.shape == shape and ours.dtype == dtype
    assert torch.equal(ours, t.get_original_weight().to(dtype))  # torchao's own dequantization: the oracle


def test_bitsandbytes_kernel_is_not_used_on_levels_it_does_not_have():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as torchao_to_nf4

    from loralab.peft.quant import dequantize_nf4

    t = torchao_to_nf4(torch.randn(64, 128), 64, 128)  # torchao's table, rounded to 4 decimals
    assert torch.equal(dequantize_nf4(t, torch.float32), t.get_original_weight())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block,scaler_block", [((64, 96), 32, 8), ((128, 256), 128, 64),
                                                       ((48, 64), 16, 192), ((256, 64), 64, 256)])
def test_dequantization_equals_torchaos_for_any_block_layout_and_its_own_levels(shape, block, scaler_block, dtype):
    # Tensors torchao quantizes itself (its 4-decimal levels, other block and scale-group sizes):
    # dequantize_nf4 reads whatever the tensor stores, so it still equals torchao bit for bit.
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as torchao_to_nf4

    from loralab.peft.quant import dequantize_nf4

    torch.manual_seed(5)
    t = torchao_to_nf4(torch.randn(shape), block, scaler_block)
    assert t.quantized_scalers.dtype == torch.int8  # the scales really are double-quantized
    assert torch.equal(dequantize_nf4(t, dtype), t.get_original_weight().to(dtype))


@pytest.mark.parametrize("kernel", ["torch", "bitsandbytes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_equal_torchaos_linear_nf4(dtype, kernel):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    q = NF4Linear.from_linear(_linear(96, 128, bias=False), dtype)
    q.kernel = _kernel_or_skip(kernel)
    x = torch.randn(3, 5, 128, dtype=dtype)
    grads = []
    for f in (q, lambda v: linear_nf4(v, q.weight)):
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        (y.float() ** 2).sum().backward()
        grads.append((y.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert q.weight.grad is None
