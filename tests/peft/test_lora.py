"""Our LoRA engine against PEFT (the oracle) on tiny random Llamas, plus its own contracts."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import UserError
from loralab.peft.inject import count_parameters, inject, load_lora_state_dict, lora_state_dict
from loralab.peft.lora import LoRALinear, LoraSpec, lora_modules
from loralab.peft.merge import merge, merge_and_unload, unmerge
from loralab.peft.targets import resolve_targets
from tinymodels import randomize_lora as randomize
from tinymodels import tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))
LLAMA_LINEAR = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"




def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_twin(model, base, targets, r, alpha):
    """A PEFT model over `base` holding the same A and B as our injected `model`."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)).eval()
    with torch.no_grad():
        for name, m in lora_modules(model):
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A.weight)
            layer.lora_B["default"].weight.copy_(m.lora_B.weight)
    return pm


def peft_wrapped(pm):
    from peft.tuners.lora import LoraLayer

    return {n for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


# PEFT's own spelling of each preset (its "all-linear" checks our structural detection independently).
PEFT_SPELLING = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
    "all-linear+head": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
}


@pytest.mark.parametrize("preset", list(PEFT_SPELLING))
def test_matches_peft_logits_for_each_preset(preset):
    base = tiny_llama(0)
    ours = tiny_llama(0)
    before = logits(ours)
    names = inject(ours, preset, LoraSpec(r=4, alpha=8, dropout=0.0))
    randomize(ours.eval())
    pm = peft_twin(ours, base, PEFT_SPELLING[preset], r=4, alpha=8)
    assert peft_wrapped(pm) == set(names)
    got, want = logits(ours), logits(pm)
    assert (got - want).abs().max() <= 1e-5
    assert (got - before).abs().max() > 1e-2  # the adapter really acts


def test_structural_all_linear_on_another_architecture():
    """GPT-NeoX-Japanese names its layers differently and its output layer `embed_out`, not lm_head."""
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXJapaneseConfig(vocab_size=128, hidden_size=32, intermediate_multiple_size=2, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    base = GPTNeoXJapaneseForCausalLM(cfg).eval()
    ours = copy.deepcopy(base)
    names = inject(ours, "all-linear", LoraSpec(r=2, alpha=4, dropout=0.0))
    assert names and not any("embed_out" in n for n in names)
    assert "embed_out" in resolve_targets(base, "all-linear+head")
    randomize(ours)
    pm = peft_twin(ours, base, "all-linear", r=2, alpha=4)
    assert peft_wrapped(pm) == set(names)
    assert (logits(ours) - logits(pm)).abs().max() <= 1e-5


def test_target_forms_resolve_to_full_names():
    m = tiny_llama(0)
    qv = resolve_targets(m, "qv")
    assert qv == resolve_targets(m, ["q_proj", "v_proj"]) == resolve_targets(m, qv)
    assert qv[0] == "model.layers.0.self_attn.q_proj" and len(qv) == 4
    assert resolve_targets(m, ["self_attn.q_proj"]) == [n for n in qv if n.endswith("q_proj")]
    assert resolve_targets(m, r"model\.layers\.1\..*_proj") == [
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert "lm_head" not in resolve_targets(m, "all-linear")
    assert resolve_targets(m, "all-linear+head")[-1] == "lm_head"


@pytest.mark.parametrize("targets", [["qq_proj"], "qq_proj", ["q_proj", "qq_proj"]])
def test_unknown_target_lists_the_models_linear_names(targets):
    with pytest.raises(UserError) as e:
        inject(tiny_llama(0), targets, LoraSpec(r=4, alpha=8))
    msg = str(e.value)
    assert "unknown LoRA target 'qq_proj'" in msg
    assert f"the model's linear modules are: {LLAMA_LINEAR}" in msg


def test_non_linear_and_empty_targets_are_user_errors():
    m = tiny_llama(0)
    with pytest.raises(UserError, match="not a linear layer"):
        resolve_targets(m, ["mlp"])
    with pytest.raises(UserError, match="empty"):
        resolve_targets(m, [])
    with pytest.raises(UserError, match="select no module"):
        resolve_targets(nn.Sequential(nn.ReLU()), "all-linear")
    assert not list(lora_modules(m))  # nothing was changed


@pytest.mark.parametrize("kw, key", [(dict(r=0), "lora.r"), (dict(r=-3), "lora.r"), (dict(r=2.5), "lora.r"),
                                     (dict(alpha=0), "lora.alpha"), (dict(alpha=-1.0), "lora.alpha"),
                                     (dict(dropout=1.0), "lora.dropout"), (dict(dropout=-0.1), "lora.dropout")])
def test_bad_hyperparameters_name_the_config_key(kw, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        LoraSpec(**{"r": 4, "alpha": 8, **kw})


def test_a_bad_spec_for_one_module_leaves_the_model_untouched():
    m = tiny_llama(0)
    before = logits(m)

    def spec_for(name):  # the last module's spec is invalid: nothing may be wrapped
        return LoraSpec(r=0 if name.endswith("layers.1.self_attn.v_proj") else 2, alpha=4)

    with pytest.raises(UserError, match="lora.r"):
        inject(m, "qv", spec_for)
    assert not list(lora_modules(m)) and all(p.requires_grad for p in m.parameters())
    assert torch.equal(logits(m), before)


def test_per_module_specs_and_rslora_scaling():
    m = tiny_llama(0)
    names = inject(m, "qv", lambda n: LoraSpec(r=8 if "q_proj" in n else 2, alpha=16, use_rslora="layers.1" in n))
    got = {n: (mod.r, mod.scaling) for n, mod in lora_modules(m)}
    assert got == {names[0]: (8, 2.0), names[1]: (2, 8.0), names[2]: (8, 16 / 8 ** 0.5), names[3]: (2, 16 / 2 ** 0.5)}
    assert m.get_submodule(names[0]).lora_A.weight.shape == (8, 32)


def test_only_lora_params_train_and_counts_match_closed_form():
    m = tiny_llama(0)
    _, total0 = count_parameters(m)
    h, inter, vocab, kv = 32, 64, 128, 16  # kv = 2 kv-heads * head_dim 8
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    assert total0 == 2 * vocab * h + 2 * per_layer + h  # embed + lm_head + layers + final norm
    names = inject(m, "qv", LoraSpec(r=4, alpha=8))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    t, total = count_parameters(m)
    assert t == 2 * (4 * (h + h) + 4 * (h + kv))  # r*(in+out) per wrapped module, 2 layers
    assert total == total0 + t
    assert set(lora_state_dict(m)) == trainable


def test_tied_embeddings_are_counted_once():
    tied = tiny_llama(0, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied_total = count_parameters(tiny_llama(0))[1]
    assert count_parameters(tied) == (untied_total - 128 * 32,) * 2  # fresh model: all trainable
    inject(tied, "all-linear+head", LoraSpec(r=2, alpha=4))
    t, total = count_parameters(tied)
    assert t == 2 * (2 * (32 + 32) * 2 + 2 * (32 + 16) * 2 + 3 * 2 * (32 + 64)) + 2 * (32 + 128)
    assert total == untied_total - 128 * 32 + t


def test_dropout_touches_only_the_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, LoraSpec(r=4, alpha=8, dropout=0.9)).train()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: exactly the base, dropout or not
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # dropout is live on the LoRA path...
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # ...and off in eval
    assert isinstance(LoRALinear(base, LoraSpec(4, 8, 0.0)).lora_dropout, nn.Identity)


def test_init_a_kaiming_b_zero_and_scaling():
    layer = LoRALinear(nn.Linear(64, 8), LoraSpec(r=4, alpha=12, dropout=0.0))
    assert layer.scaling == 3.0 and not layer.merged
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert 0 < layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (8, 4)


def test_bf16_base_fp32_lora_dtypes_and_grads():
    m = tiny_llama(0).to(torch.bfloat16)
    inject(m, "qv", LoraSpec(r=4, alpha=8, dropout=0.1))
    randomize(m).train()
    out = m(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    for _, mod in lora_modules(m):
        assert mod.base.weight.dtype == torch.bfloat16 and mod.base.weight.grad is None
        for w in (mod.lora_A.weight, mod.lora_B.weight):
            assert w.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.float32
            assert w.grad.abs().sum() > 0


def test_merge_unmerge_and_merge_and_unload():
    m = tiny_llama(0)
    names = inject(m, "all-linear+head", LoraSpec(r=4, alpha=8, dropout=0.0))
    randomize(m)
    base_w = {n: m.get_submodule(n).base.weight.detach().clone() for n in names}
    want = logits(m)
    merge(m)
    assert all(mod.merged for _, mod in lora_modules(m))
    assert (m.lm_head.base.weight - base_w["lm_head"]).abs().max() > 1e-3
    assert (logits(m) - want).abs().max() <= 1e-5
    unmerge(m)
    for n in names:
        assert (m.get_submodule(n).base.weight - base_w[n]).abs().max() <= 1e-6
    assert (logits(m) - want).abs().max() <= 1e-5
    assert merge_and_unload(m) is m
    for n in names:
        assert type(m.get_submodule(n)) is nn.Linear and not m.get_submodule(n).weight.requires_grad
    assert not list(lora_modules(m))
    assert (logits(m) - want).abs().max() <= 1e-5


def test_merge_keeps_bias_and_a_merged_module_unloads_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    inject(model, ["0", "2"], LoraSpec(r=2, alpha=2, dropout=0.0))
    randomize(model)
    x = torch.randn(3, 8)
    want = model(x)
    merge(model)  # merged modules must not get the update twice on unload
    merge_and_unload(model, dtype=torch.float64)
    assert model[0].weight.dtype == torch.float64 and model[0].bias is not None
    assert (model(x.double()) - want.double()).abs().max() <= 1e-5


def test_tied_head_merges_by_unloading_only():
    m = tiny_llama(0, tie_word_embeddings=True)
    inject(m, "all-linear+head", LoraSpec(r=2, alpha=4, dropout=0.0))
    randomize(m)
    emb = m.model.embed_tokens.weight.detach().clone()
    want = logits(m)
    with pytest.raises(UserError, match="tied"):
        merge(m)
    merge_and_unload(m)
    assert torch.equal(m.model.embed_tokens.weight, emb)  # the input embeddings are untouched
    assert (logits(m) - want).abs().max() <= 1e-5


class FakeQuantLinear(nn.Module):
    """Duck-typed quantized base: int8 codes + per-row scale, dequantized for each matmul."""

    def __init__(self, linear: nn.Linear, compute_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None
        self.compute_dtype = compute_dtype

    def dequantize(self):
        return (self.codes.float() * self.scale).to(self.compute_dtype)

    def forward(self, x):
        return F.linear(x, self.dequantize().to(x.dtype))


def test_quantized_base_is_found_counted_and_unloaded_dequantized():
    m = tiny_llama(0)
    plain_total = count_parameters(m)[1]
    for layer in m.model.layers:
        layer.self_attn.q_proj = FakeQuantLinear(layer.self_attn.q_proj)
    assert resolve_targets(m, "all-linear") == resolve_targets(tiny_llama(0), "all-linear")
    assert count_parameters(m)[1] == plain_total
    names = inject(m, "qv", LoraSpec(r=2, alpha=4, dropout=0.0))
    randomize(m)
    want = logits(m)
    with pytest.raises(UserError, match="merge_and_unload"):
        merge(m)
    merge_and_unload(m)
    for n in names:
        assert type(m.get_submodule(n)) is nn.Linear and m.get_submodule(n).weight.dtype == torch.float32
    assert (logits(m) - want).abs().max() <= 1e-5


def test_state_dict_round_trip_is_strict():
    a, b = tiny_llama(0), tiny_llama(0)
    inject(a, "qv", LoraSpec(r=2, alpha=4, dropout=0.0))
    inject(b, "qv", LoraSpec(r=2, alpha=4, dropout=0.0))
    sd = lora_state_dict(randomize(a))
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    load_lora_state_dict(b, sd)
    assert torch.equal(logits(a), logits(b))
    with pytest.raises(UserError, match="missing"):
        load_lora_state_dict(b, {k: v for k, v in sd.items() if "layers.1" not in k})
    with pytest.raises(UserError, match="unexpected"):
        load_lora_state_dict(b, {**sd, "x.lora_A.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="shape"):
        load_lora_state_dict(b, {k: v[:1] for k, v in sd.items()})
    with pytest.raises(UserError, match="already has a LoRA"):
        inject(b, "qv", LoraSpec(r=2, alpha=4))


def test_zero_updates_skipped_gives_the_same_outputs_and_restores_every_layer():
    from loralab.peft.lora import zero_updates_skipped

    model = tiny_llama(3)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    layers = dict(lora_modules(model))
    trained = layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        trained.lora_B.weight.normal_()
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    model.eval()
    with torch.no_grad():
        want = model(x).logits
        with zero_updates_skipped(model):
            assert {n for n, m in layers.items() if m.merged} == set(layers) - {"model.layers.0.self_attn.q_proj"}
            got = model(x).logits
    assert torch.equal(got, want)  # base + 0 is base; the nonzero layer still ran
    assert not any(m.merged for m in layers.values())
