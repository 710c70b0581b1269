"""LoRA over GPT-2's Conv1D layers (weights stored (in, out)), with PEFT's fan_in_fan_out as the oracle."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from loralab.errors import UserError
from loralab.peft import fused
from loralab.peft.adapters import load_adapter, save_adapter
from loralab.peft.inject import inject
from loralab.peft.lora import LoRALinear, LoraSpec, lora_modules
from loralab.peft.merge import merge, merge_and_unload, unmerge
from loralab.peft.targets import resolve_targets
from tinymodels import tiny_gpt2

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))
BODY = ["c_attn", "c_proj", "c_fc"]  # c_proj: the attention's output and the MLP's down projection
CONV1D_NAMES = [f"transformer.h.{i}.{n}" for i in range(2)
                for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ours(targets="all-linear", seed=0, **spec):
    """A tiny GPT-2 with LoRA (r=4, alpha=8) and a non-zero B, so the update changes the output."""
    model = tiny_gpt2(seed)
    inject(model, targets, LoraSpec(**{"r": 4, "alpha": 8, **spec}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def peft_twin(model, targets=BODY, **config):
    """PEFT's LoRA on a fresh copy of the same GPT-2, holding `model`'s A, B (and DoRA magnitudes)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=True, **config)
    pm = get_peft_model(tiny_gpt2(0), cfg).eval()
    with torch.no_grad():
        for name, m in lora_modules(model):
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A.weight)
            layer.lora_B["default"].weight.copy_(m.lora_B.weight)
            if m.spec.use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)
    return pm


def test_all_linear_selects_every_conv1d_and_never_the_head():
    from peft.tuners.lora import LoraLayer

    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2()
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in CONV1D_NAMES)
    assert resolve_targets(model, "all-linear") == CONV1D_NAMES
    assert resolve_targets(model, "all-linear+head") == CONV1D_NAMES + ["lm_head"]
    assert resolve_targets(model, ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert resolve_targets(model, ["mlp.c_proj"]) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert resolve_targets(model, r"transformer\.h\.1\..*") == CONV1D_NAMES[4:]
    # PEFT's own "all-linear" on the same model picks the same layers
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=True))
    assert sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, LoraLayer)) == sorted(CONV1D_NAMES)


def test_the_layer_reads_in_and_out_from_the_transposed_weight():
    model = ours()
    layer = model.get_submodule("transformer.h.0.mlp.c_fc")  # 64 in, 256 out; weight (64, 256)
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (64, 256)
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (256, 4)
    assert model.get_submodule("lm_head").__class__ is not LoRALinear


@pytest.mark.parametrize("fuse", [True, False])
def test_forward_and_one_sgd_step_match_peft(fuse, monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", fuse)
    model = ours().train()
    pm = peft_twin(model).train()
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert fused.fusable(layer, torch.zeros(1, 64)) is fuse  # both paths are covered
    assert rel_err(logits(model), logits(tiny_gpt2(0))) > 1e-3  # the update is not negligible
    assert rel_err(logits(model), logits(pm)) < 1e-5

    targets = IDS[:, 1:]
    for m in (model, pm):
        out = m(input_ids=IDS).logits[:, :-1]
        F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)).backward()
    peft_params = dict(pm.base_model.model.named_parameters())
    for name, m in lora_modules(model):
        for ab in ("lora_A", "lora_B"):
            theirs = peft_params[f"{name}.{ab}.default.weight"]
            assert m.get_submodule(ab).weight.grad is not None
            assert rel_err(m.get_submodule(ab).weight.grad, theirs.grad) < 1e-5, (name, ab)
    for m in (model, pm):
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
    assert rel_err(logits(model), logits(pm)) < 1e-5


def test_dora_over_conv1d_matches_peft_and_merges_to_the_same_output():
    model = ours(use_dora=True).train()
    pm = peft_twin(model, use_dora=True).train()
    assert rel_err(logits(model), logits(pm)) < 1e-5
    for m in (model, pm):
        m(input_ids=IDS).logits.square().mean().backward()
    peft_params = dict(pm.base_model.model.named_parameters())
    for name, m in lora_modules(model):
        theirs = peft_params[f"{name}.lora_magnitude_vector.default.weight"].grad
        assert rel_err(m.lora_magnitude_vector.grad, theirs) < 1e-5, name
    model.eval()
    before = logits(model)
    assert rel_err(logits(merge_and_unload(model)), before) < 1e-5


def test_olora_init_on_conv1d_starts_as_the_base_and_saves_for_the_original(tmp_path):
    from peft import PeftModel

    base = tiny_gpt2(0)
    model = tiny_gpt2(0)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, init="olora"))
    assert rel_err(logits(model), logits(base)) < 1e-5  # the residual plus s·B0 A0 is the original weight
    layer = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert layer.base.weight.shape == (64, 256)  # still the Conv1D's (in, out) layout
    moved = (layer.lora_B0 @ layer.lora_A0) * layer.scaling  # (out, in)
    original = base.get_submodule("transformer.h.0.mlp.c_fc").weight
    assert rel_err(layer.base.weight + moved.t(), original) < 1e-5
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.add_(torch.randn_like(m.lora_B.weight) * 0.05)  # as if trained
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny-gpt2")
    pm = PeftModel.from_pretrained(tiny_gpt2(0), tmp_path / "ad").eval()
    assert rel_err(logits(model), logits(pm)) < 1e-5


def test_peft_loads_our_adapter_and_we_load_it_back(tmp_path):
    from peft import PeftModel

    model = ours().eval()
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny-gpt2")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and sorted(cfg["target_modules"]) == sorted(BODY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(tiny_gpt2(0), tmp_path / "ad").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # PEFT had nothing to correct
    assert rel_err(logits(pm), logits(model)) < 1e-5
    again = tiny_gpt2(0)
    load_adapter(again, tmp_path / "ad")
    assert rel_err(logits(again), logits(model)) < 1e-5


def test_a_peft_saved_gpt2_adapter_loads_in_loralab(tmp_path):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_gpt2(0), LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                 fan_in_fan_out=True, lora_dropout=0.0)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_gpt2(0)
    load_adapter(model, tmp_path / "peft")
    wanted = [n for n in CONV1D_NAMES if n.endswith(("c_attn", "c_fc"))]
    assert sorted(n for n, _ in lora_modules(model)) == sorted(wanted)
    assert rel_err(logits(model), logits(pm)) < 1e-5


def test_a_non_boolean_fan_in_fan_out_is_refused_in_one_line(tmp_path):
    model = ours()
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny-gpt2")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": "yes"}))
    fresh = tiny_gpt2(0)
    with pytest.raises(UserError, match="fan_in_fan_out must be true or false"):
        load_adapter(fresh, tmp_path / "ad")
    assert not list(lora_modules(fresh))


def test_merge_in_place_adds_the_transposed_update_and_unmerge_restores():
    model = ours().eval()
    layer = model.get_submodule("transformer.h.1.attn.c_attn")
    w0 = layer.base.weight.detach().clone()
    expected = logits(model)
    merge(model)
    delta = (layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling  # (out, in) = (192, 64)
    torch.testing.assert_close(layer.base.weight, w0 + delta.t(), rtol=1e-6, atol=1e-6)
    assert rel_err(logits(model), expected) < 1e-5
    unmerge(model)
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-6, atol=1e-6)


def test_merge_and_unload_keeps_conv1d_and_transformers_loads_the_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ours().eval()
    expected = logits(model)
    merged = merge_and_unload(model)
    assert all(type(merged.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
    assert merged.get_submodule("transformer.h.0.mlp.c_fc").weight.shape == (64, 256)
    assert rel_err(logits(merged), expected) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel_err(logits(again), expected) < 1e-5
    # PEFT's own merge of the same factors gives the same weights
    theirs = peft_twin(ours()).merge_and_unload()
    for n in CONV1D_NAMES:
        torch.testing.assert_close(merged.get_submodule(n).weight, theirs.get_submodule(n).weight,
                                   rtol=1e-5, atol=1e-6)


def test_qlora_over_conv1d_quantizes_transposed_and_merges_back_to_conv1d():
    pytest.importorskip("torchao")
    from loralab.peft.quant import NF4Linear, quantize_model

    model = tiny_gpt2(0)
    assert quantize_model(model) == len(CONV1D_NAMES)  # every Conv1D, not the output layer
    assert type(model.get_submodule("lm_head")) is torch.nn.Linear
    q = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(q, NF4Linear) and q.fan_in_fan_out and (q.in_features, q.out_features) == (64, 256)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8))
    assert resolve_targets(tiny_gpt2(0), "all-linear") == [n for n, _ in lora_modules(model)]
    # the same LoRA over a dense GPT-2 holding the dequantized weights computes the same
    dense = tiny_gpt2(0)
    with torch.no_grad():
        for n in CONV1D_NAMES:
            dense.get_submodule(n).weight.copy_(model.get_submodule(n).base.dequantize().t())
    inject(dense, "all-linear", LoraSpec(r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (_, m), (_, d) in zip(lora_modules(model), lora_modules(dense)):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
            d.lora_A.weight.copy_(m.lora_A.weight)
            d.lora_B.weight.copy_(m.lora_B.weight)
    expected = logits(dense)
    assert rel_err(logits(model), expected) < 1e-5
    merged = merge_and_unload(model)
    assert all(type(merged.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
    assert rel_err(logits(merged), expected) < 1e-5


def test_quantizing_a_named_conv1d_and_refusing_a_non_linear():
    pytest.importorskip("torchao")
    from loralab.peft.quant import NF4Linear, quantize_model

    model = tiny_gpt2(0)
    assert quantize_model(model, ["transformer.h.0.attn.c_attn"]) == 1
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_attn"), NF4Linear)
    with pytest.raises(UserError, match="LayerNorm, not nn.Linear"):
        quantize_model(model, ["transformer.h.0.ln_1"])


def test_module_widths_read_conv1d_shapes():
    from loralab.memory.preflight import check_rank, module_widths

    model = tiny_gpt2(0)
    widths = module_widths({n: model.get_submodule(n) for n in CONV1D_NAMES})
    assert widths["c_attn"] == (64, 192) and widths["c_fc"] == (64, 256)
    assert min(widths["c_proj"]) == 64  # attn.c_proj 64 x 64, mlp.c_proj 256 x 64: the narrowest kept
    with pytest.raises(UserError, match="lora.r"):
        check_rank(65, widths)


def test_gguf_export_refuses_gpt2_in_one_line():
    from loralab.io.gguf import LoraFactors, write_lora_gguf

    model = ours()
    factors = [LoraFactors(n, m.lora_A.weight, m.lora_B.weight, m.scaling) for n, m in lora_modules(model)]
    with pytest.raises(UserError, match="not 'gpt2'") as e:
        write_lora_gguf("never.gguf", model.config, factors, alpha=8)
    assert "\n" not in str(e.value)


def test_combining_gpt2_adapters_keeps_fan_in_fan_out(tmp_path):
    from loralab.peft.combine import combine_adapters

    save_adapter(ours(), tmp_path / "a", base_model_name_or_path="tiny-gpt2")
    save_adapter(ours(seed=0, r=2), tmp_path / "b", base_model_name_or_path="tiny-gpt2")
    out = combine_adapters([(tmp_path / "a", 0.5), (tmp_path / "b", 0.5)], tmp_path / "ab", method="cat")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = tiny_gpt2(0)
    load_adapter(model, out)
    assert len(list(lora_modules(model))) == len(CONV1D_NAMES)


def test_head_and_conv1d_targets_together_load_in_peft(tmp_path):
    """GPT-2's lm_head is an nn.Linear (tied to the embeddings) among Conv1D targets: PEFT's single
    fan_in_fan_out flag is corrected per layer on loading, and the logits agree."""
    from peft import PeftModel

    model = ours("all-linear+head").eval()
    assert not model.get_submodule("lm_head").fan_in_fan_out
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny-gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it switches the flag for lm_head
        pm = PeftModel.from_pretrained(tiny_gpt2(0), tmp_path / "ad").eval()
    assert rel_err(logits(pm), logits(model)) < 1e-5


def test_a_subset_of_layers_saves_as_layers_to_transform(tmp_path):
    from peft import PeftModel

    model = ours(CONV1D_NAMES[4:])  # layer 1 only
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny-gpt2")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["fan_in_fan_out"] is True
    pm = PeftModel.from_pretrained(tiny_gpt2(0), tmp_path / "ad").eval()
    assert rel_err(logits(pm), logits(model.eval())) < 1e-5


def test_bf16_conv1d_base_fused_matches_the_composition(monkeypatch):
    def run(fuse):
        monkeypatch.setattr(fused, "ENABLED", fuse)
        model = ours().to(torch.bfloat16)
        for _, m in lora_modules(model):
            m.lora_A.float(), m.lora_B.float()  # fp32 factors over the bf16 base, as training keeps them
        model.train()
        out = model(input_ids=IDS).logits.float()
        out.square().mean().backward()
        return out, [m.lora_A.weight.grad for _, m in lora_modules(model)]

    (y1, g1), (y0, g0) = run(True), run(False)
    assert all(g.dtype == torch.float32 for g in g1)
    assert rel_err(y1, y0) < 1e-2
    assert all(rel_err(a, b) < 5e-2 for a, b in zip(g1, g0))
