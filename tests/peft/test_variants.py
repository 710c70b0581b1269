"""Every LoRA variant against PEFT (the oracle): rsLoRA, DoRA, the inits (gaussian, PiSSA, OLoRA),
per-module rank / alpha and a subset of layers, each saved, loaded both ways and merged."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import UserError
from loralab.peft.adapters import load_adapter, save_adapter
from loralab.peft.inject import inject, per_module
from loralab.peft.lora import LoRALinear, LoraSpec, lora_modules
from loralab.peft.merge import merge, merge_and_unload, unmerge
from tinymodels import randomize_lora, tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(11))

VARIANTS = {
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "gaussian": dict(init="gaussian"),
    "pissa": dict(init="pissa"),
    "pissa_niter": dict(init="pissa_niter_2"),
    "olora": dict(init="olora"),
    "olora+rslora": dict(init="olora", use_rslora=True),
    "dora+pissa+rslora": dict(use_dora=True, init="pissa", use_rslora=True),
}
PATTERNS = {
    "uniform": dict(),
    "patterns": dict(rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32}),
    "layer1": dict(layers=[1]),
}
PEFT_INIT = {"kaiming": True, "gaussian": "gaussian"}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def perturb(model, seed=3, scale=0.2):
    """As if trained: new random A and B, magnitudes off their start."""
    g = torch.Generator().manual_seed(seed)
    randomize_lora(model, scale=scale, generator=g)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if m.spec.use_dora:
                m.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(m.out_features, generator=g))
    return model


def ours(variant, pattern, r=4, alpha=8):
    m = tiny_llama(0)
    kw = PATTERNS[pattern]
    targets = "all-linear"
    if "layers" in kw:
        targets = [n for n in [f"model.layers.{i}.{p}" for i in (0, 1) for p in
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] if ".1." in n]
    spec = LoraSpec(r=r, alpha=alpha, dropout=0.0, **VARIANTS[variant])
    inject(m, targets, per_module(spec, kw.get("rank_pattern"), kw.get("alpha_pattern")))
    return perturb(m.eval())


def peft_loads(folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(0), folder).eval()


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_adapter_loads_in_peft_and_ours_and_merges(variant, pattern, tmp_path):
    m = ours(variant, pattern)
    want = logits(m)
    assert (want - logits(tiny_llama(0))).abs().max() > 1e-2  # the adapter really acts
    save_adapter(m, tmp_path / "ad", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    kw = VARIANTS[variant]
    assert cfg["use_dora"] == kw.get("use_dora", False) and cfg["use_rslora"] == kw.get("use_rslora", False)
    assert cfg["init_lora_weights"] is True  # PiSSA / OLoRA saved converted: for the original base
    if pattern == "layer1":
        assert cfg["layers_to_transform"] == [1]
    # PEFT on the original base model.
    assert (logits(peft_loads(tmp_path / "ad")) - want).abs().max() <= 1e-5
    # Ours on the original base model.
    again = tiny_llama(0)
    load_adapter(again, tmp_path / "ad")
    assert (logits(again.eval()) - want).abs().max() <= 1e-5
    # Merged in place and back; merged for good.
    merge(again)
    assert (logits(again) - want).abs().max() <= 1e-4
    unmerge(again)
    assert (logits(again) - want).abs().max() <= 1e-4
    merge_and_unload(again)
    assert not list(lora_modules(again))
    assert (logits(again) - want).abs().max() <= 1e-4


def _peft_model(variant, pattern, r=4, alpha=8, seed=5):
    from peft import LoraConfig, get_peft_model

    kw = dict(VARIANTS[variant])
    init = kw.pop("init", "kaiming")
    extra, targets = dict(PATTERNS[pattern]), "all-linear"
    if "layers" in extra:  # PEFT takes layers_to_transform with a list of names only
        extra = {"layers_to_transform": extra["layers"]}
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        init_lora_weights=PEFT_INIT.get(init, init), **kw, **extra)
    return get_peft_model(tiny_llama(0), config).eval()


def _perturb_peft(pm, seed=6):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    return pm


@pytest.mark.filterwarnings("ignore:Using Rank-Stabilized LoRA with rank_pattern:UserWarning")  # PEFT's, on config
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "pissa_niter"])
def test_a_peft_saved_adapter_loads_in_ours(variant, pattern, tmp_path):
    """PEFT saves PiSSA / OLoRA unconverted unless asked: the loader redoes the init on the base, as
    PEFT's own loader does (deterministic for pissa and olora)."""
    pm = _perturb_peft(_peft_model(variant, pattern))
    pm.save_pretrained(tmp_path / "peft")
    m = tiny_llama(0)
    load_adapter(m, tmp_path / "peft")
    assert (logits(m.eval()) - logits(pm)).abs().max() <= 1e-5
    merge_and_unload(m)
    assert (logits(m) - logits(pm)).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["pissa", "pissa_niter", "olora", "olora+rslora"])
def test_peft_converted_adapter_equals_ours_and_applies_to_the_original_base(variant, tmp_path):
    """PEFT's conversion (path_initial_model_for_weight_conversion) and ours give the same kind of
    adapter: rank 2r, for the original base, computing what the model on the residual base does.
    (PEFT 0.21 drops DoRA's magnitude vectors when converting; ours keeps them: the first test.)"""
    pm = _peft_model(variant, "uniform")
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")
    _perturb_peft(pm)
    pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    cfg = json.loads((tmp_path / "conv/adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    m = tiny_llama(0)
    load_adapter(m, tmp_path / "conv")
    assert (logits(m.eval()) - logits(pm)).abs().max() <= 1e-5


def test_trained_pissa_and_olora_save_for_the_original_base(tmp_path):
    """Train a few steps on the residual base; the converted adapter on the untouched base gives the
    trained model's logits, in PEFT and in ours; the base of the trained model really changed."""
    from peft import PeftModel

    for init in ("pissa", "olora"):
        m = tiny_llama(0)
        inject(m, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0, init=init))
        q = m.model.layers[0].self_attn.q_proj
        assert (q.base.weight - tiny_llama(0).model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3
        assert (logits(m) - logits(tiny_llama(0))).abs().max() <= 1e-4  # starts as the base
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m.train()
        for _ in range(3):
            m(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
        m.eval()
        save_adapter(m, tmp_path / init, base_model_name_or_path="tiny-llama")
        cfg = json.loads((tmp_path / init / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
        want = logits(m)
        assert (want - logits(tiny_llama(0))).abs().max() > 1e-3
        assert (logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / init).eval()) - want).abs().max() <= 1e-5


def _dora_pair(bias: bool, dropout: float = 0.0, seed: int = 0):
    """Our DoRA layer and PEFT's on the same nn.Linear, A, B and magnitude."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from peft import LoraConfig

    torch.manual_seed(seed)
    base = nn.Linear(24, 16, bias=bias)
    base.requires_grad_(False)
    ourl = LoRALinear(copy.deepcopy(base), LoraSpec(r=4, alpha=12, dropout=dropout, use_dora=True))
    cfg = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, use_dora=True)
    theirs = PeftLinear(copy.deepcopy(base), "default", r=4, lora_alpha=12, lora_dropout=dropout, use_dora=True,
                        config=cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        ourl.lora_A.weight.copy_(torch.randn(4, 24, generator=g) * 0.3)
        ourl.lora_B.weight.copy_(torch.randn(16, 4, generator=g) * 0.3)
        ourl.lora_magnitude_vector.copy_(ourl.lora_magnitude_vector * (1 + torch.rand(16, generator=g)))
        theirs.lora_A["default"].weight.copy_(ourl.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ourl.lora_B.weight)
        theirs.lora_magnitude_vector["default"].weight.copy_(ourl.lora_magnitude_vector)
    return ourl, theirs


@pytest.mark.parametrize("bias", [False, True])
def test_dora_forward_and_gradients_equal_peft(bias):
    ourl, theirs = _dora_pair(bias)
    assert torch.allclose(ourl.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
    ourl.train()
    theirs.train()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(9))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ourl(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    w = torch.randn(ya.shape, generator=torch.Generator().manual_seed(10))
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for mine, peft_p in ((ourl.lora_A.weight, theirs.lora_A["default"].weight),
                         (ourl.lora_B.weight, theirs.lora_B["default"].weight),
                         (ourl.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(mine.grad, peft_p.grad, rtol=1e-4, atol=1e-5)  # fp32, other op order
        assert mine.grad.abs().sum() > 0


def test_dora_weight_norm_without_the_dense_update_equals_the_dense_norm():
    from loralab.peft.variants import Dora

    ourl, _ = _dora_pair(True)
    dense = ourl.base.weight + ourl.delta_weight()
    torch.testing.assert_close(Dora.weight_norm(ourl), torch.linalg.norm(dense, dim=1), rtol=1e-6, atol=1e-6)


def test_dora_dropout_acts_on_the_low_rank_path_only():
    """Our documented difference from PEFT: dropout on the low-rank input only (no second full matmul)."""
    ourl, _ = _dora_pair(False, dropout=0.5)
    ourl.train()
    x = torch.randn(4, 24)
    with torch.no_grad():
        ourl.lora_B.weight.zero_()  # no low-rank path: dropout can change nothing
        g = ourl.lora_magnitude_vector / torch.linalg.norm(ourl.base.weight, dim=1)
        assert torch.allclose(ourl(x), ourl(x)) and torch.allclose(ourl(x), g * ourl.base(x), atol=1e-6)


def test_a_fresh_dora_model_is_the_base_and_dora_state_dict_is_peft_named():
    m = tiny_llama(0)
    inject(m, "qv", LoraSpec(r=4, alpha=8, use_dora=True, init="gaussian"))
    assert (logits(m) - logits(tiny_llama(0))).abs().max() <= 1e-5
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector" in trainable
    assert len(trainable) == 3 * 4


def test_nf4_base_with_dora_and_rslora_saves_for_peft(tmp_path):
    """QLoRA + DoRA and QLoRA + rsLoRA: PEFT on the dequantized dense base gives our logits."""
    from loralab.peft.quant import NF4Linear, quantize_model
    from peft import PeftModel

    dense = tiny_llama(0, hidden_size=64, intermediate_size=128)
    for kw in (dict(use_dora=True), dict(use_rslora=True), dict(use_dora=True, init="olora")):
        q = copy.deepcopy(dense)
        quantize_model(q)
        inject(q, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0, **kw))
        perturb(q.eval())
        want = logits(q)
        save_adapter(q, tmp_path / "ad", base_model_name_or_path="tiny")
        deq = copy.deepcopy(dense)
        ref = copy.deepcopy(dense)
        quantize_model(ref)  # the same deterministic NF4 codes as q's base had before any init
        with torch.no_grad():
            for name, mod in ref.named_modules():
                if isinstance(mod, NF4Linear):
                    deq.get_submodule(name).weight.copy_(mod.dequantize())
        tol = 1e-4 if "init" not in kw else 5e-2  # OLoRA re-quantizes its residual: NF4 error again
        assert (logits(PeftModel.from_pretrained(deq, tmp_path / "ad").eval()) - want).abs().max() <= tol
        assert (logits(merge_and_unload(q)) - want).abs().max() <= 1e-4


def test_bad_variant_settings_are_one_line_errors():
    with pytest.raises(UserError, match="lora.init"):
        LoraSpec(r=4, alpha=8, init="loftq")
    m = tiny_llama(0)
    with pytest.raises(UserError, match="lora.init.*r <= min"):
        inject(m, "qv", LoraSpec(r=20, alpha=8, init="pissa"))  # v_proj is 32 -> 16
    assert not list(lora_modules(m)) and torch.equal(logits(m), logits(tiny_llama(0)))
    tied = tiny_llama(0, tie_word_embeddings=True)
    emb = tied.model.embed_tokens.weight.detach().clone()
    with pytest.raises(UserError, match="shared \\(tied\\)"):  # PiSSA would rewrite the input embeddings
        inject(tied, "all-linear+head", LoraSpec(r=4, alpha=8, init="olora"))
    assert torch.equal(tied.model.embed_tokens.weight, emb) and not list(lora_modules(tied))


def test_dora_eval_caches_the_weight_norm_until_a_or_b_change(monkeypatch):
    from loralab.peft.variants import Dora

    ourl, _ = _dora_pair(False)
    ourl.eval()
    x = torch.randn(2, 24)
    first = ourl(x)
    calls, real = [], Dora.weight_norm
    monkeypatch.setattr(Dora, "weight_norm", staticmethod(lambda layer: calls.append(1) or real(layer)))
    assert torch.equal(ourl(x), first) and not calls  # cached
    with torch.no_grad():
        ourl.lora_B.weight.mul_(2)  # an in-place update, as an optimizer step
    changed = ourl(x)
    assert len(calls) == 1 and not torch.allclose(changed, first)
    dense = ourl.base.weight + ourl.delta_weight()
    want = F.linear(x, (ourl.lora_magnitude_vector / torch.linalg.norm(dense, dim=1))[:, None] * dense)
    torch.testing.assert_close(changed, want, rtol=1e-5, atol=1e-6)
    ourl.train()
    ourl(x)
    ourl(x)
    assert len(calls) == 3  # training: computed every forward
