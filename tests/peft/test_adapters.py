"""Adapter folders in PEFT's format: ours load in PEFT, PEFT's load in ours, bad folders fail clearly."""
import json

import pytest
import torch
from safetensors.torch import load_file

from loralab.errors import UserError
from loralab.peft.adapters import load_adapter, save_adapter
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec, lora_modules
from tinymodels import tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def trained(preset, r=4, alpha=8, seed=1, **model_kw):
    """A tiny model with LoRA and random non-zero A and B, as if trained."""
    m = tiny_llama(0, **model_kw)
    names = inject(m, preset, LoraSpec(r=r, alpha=alpha, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            for w in (mod.lora_A.weight, mod.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return m.eval(), names


def save(m, names, path):
    out = save_adapter(m, path, base_model_name_or_path="tiny-llama")
    assert {n for n, _ in lora_modules(m)} == set(names)
    return out


def peft_wrapped(pm):
    from peft.tuners.lora import LoraLayer

    return {n for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("preset", ["qv", "all-linear", "all-linear+head",
                                    ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]])
def test_peft_loads_our_adapter_unchanged(preset, tmp_path):
    from peft import PeftModel

    ours, names = trained(preset)
    save(ours, names, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(load_file(tmp_path / "ad/adapter_model.safetensors")) == sorted(
        f"base_model.model.{n}.lora_{x}.weight" for n in names for x in "AB")
    pm = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "ad").eval()
    assert peft_wrapped(pm) == set(names)
    assert (logits(pm) - logits(ours)).abs().max() <= 1e-5
    assert (logits(pm) - logits(tiny_llama(0))).abs().max() > 1e-2


def test_target_modules_short_names_when_exact_else_full_name_regex(tmp_path):
    m, names = trained("all-linear+head")
    save(m, names, tmp_path / "a")
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    # Only layer 0's q_proj: the short name and PEFT's layers_to_transform say exactly that.
    m, names = trained(["model.layers.0.self_attn.q_proj"])
    save(m, names, tmp_path / "b")
    cfg = json.loads((tmp_path / "b/adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["layers_to_transform"]) == (["q_proj"], [0])
    assert peft_wrapped(_peft_loads(tmp_path / "b")) == set(names)
    # q_proj of layer 0 and up_proj of layer 1: no list + layers catches exactly that, a full-name regex does.
    m, names = trained(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"])
    save(m, names, tmp_path / "c")
    cfg = json.loads((tmp_path / "c/adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str) and "layers\\.0\\." in cfg["target_modules"]
    assert cfg["layers_to_transform"] is None
    assert peft_wrapped(_peft_loads(tmp_path / "c")) == set(names)


def test_our_loader_reads_a_peft_saved_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)  # init_lora_weights=False: PEFT draws non-zero A and B itself
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "down_proj"])).eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = tiny_llama(0)
    cfg = load_adapter(ours, tmp_path / "peft")
    assert cfg["r"] == 4 and set(n for n, _ in lora_modules(ours)) == peft_wrapped(pm)
    assert (logits(ours.eval()) - logits(pm)).abs().max() <= 1e-5
    assert (logits(ours) - logits(tiny_llama(0))).abs().max() > 1e-2


def test_round_trip_through_our_loader_and_rslora(tmp_path):
    m, names = trained("attn")
    save(m, names, tmp_path / "ad")
    fresh = tiny_llama(0)
    assert load_adapter(fresh, tmp_path / "ad")["base_model_name_or_path"] == "tiny-llama"
    assert torch.equal(logits(fresh), logits(m))
    cfg_path = tmp_path / "ad/adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_rslora": True}))
    rs = tiny_llama(0)
    load_adapter(rs, tmp_path / "ad")
    assert all(mod.scaling == 8 / 2 for _, mod in lora_modules(rs))  # alpha / sqrt(r)


def _peft_saved(tmp_path, **config):
    """A PEFT adapter folder with non-zero A and B (PEFT draws them: init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    pm = get_peft_model(tiny_llama(0), LoraConfig(lora_dropout=0.0, init_lora_weights=False, **config)).eval()
    pm.save_pretrained(tmp_path / "peft")
    return pm, tmp_path / "peft"


def _peft_loads(folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(0), folder).eval()


def test_a_peft_rslora_adapter_loads_and_saves_again(tmp_path):
    """PEFT saved with use_rslora=True (scaling alpha / sqrt(r)): ours reads it, writes it back, PEFT
    reads ours: the same logits all the way."""
    pm, folder = _peft_saved(tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    ours = tiny_llama(0)
    load_adapter(ours, folder)
    assert all(mod.scaling == 8 / 4 ** 0.5 for _, mod in lora_modules(ours))
    assert (logits(ours.eval()) - logits(pm)).abs().max() <= 1e-5
    save_adapter(ours, tmp_path / "again", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "again/adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert (logits(_peft_loads(tmp_path / "again")) - logits(pm)).abs().max() <= 1e-5


def test_peft_rank_and_alpha_patterns_round_trip(tmp_path):
    """Per-module rank and alpha as PEFT writes them (rank_pattern / alpha_pattern, regex keys)."""
    ranks = {"q_proj": 8, "model.layers.1.mlp.down_proj": 2}
    pm, folder = _peft_saved(tmp_path, r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=ranks,
                             alpha_pattern={"v_proj": 32})
    ours = tiny_llama(0)
    load_adapter(ours, folder)
    got = {n: (m.r, m.alpha) for n, m in lora_modules(ours)}
    assert got["model.layers.0.self_attn.q_proj"] == (8, 8) and got["model.layers.1.mlp.down_proj"] == (2, 8)
    assert got["model.layers.0.self_attn.v_proj"] == (4, 32) and got["model.layers.0.mlp.down_proj"] == (4, 8)
    assert (logits(ours.eval()) - logits(pm)).abs().max() <= 1e-5
    save_adapter(ours, tmp_path / "again", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "again/adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["alpha_pattern"] == {"v_proj": 32}  # one value per short name: written by short name
    assert cfg["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2, "q_proj": 8}
    again = _peft_loads(tmp_path / "again")
    assert {n: m.r["default"] for n, m in again.base_model.model.named_modules() if n in got} == \
        {n: r for n, (r, _) in got.items()}
    assert (logits(again) - logits(pm)).abs().max() <= 1e-5


def test_our_per_module_ranks_load_in_peft(tmp_path):
    m = tiny_llama(0)
    inject(m, "all-linear", lambda n: LoraSpec(r=8 if n.endswith("mlp.up_proj") else 2, alpha=16))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.2)
    save_adapter(m, tmp_path / "ad", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert (cfg["r"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (2, {"up_proj": 8}, {})
    assert (logits(_peft_loads(tmp_path / "ad")) - logits(m.eval())).abs().max() <= 1e-5


def test_pattern_keys_follow_peft_matching():
    from loralab.peft.names import pattern_value

    assert pattern_value({"q_proj": 8}, "model.layers.0.self_attn.q_proj", 4) == 8
    assert pattern_value({"q_proj": 8}, "model.layers.0.self_attn.qq_proj", 4) == 4  # whole name parts only
    assert pattern_value({r"layers\.1\..*": 2, "q_proj": 8}, "model.layers.1.self_attn.q_proj", 4) == 2  # first wins


def test_adapter_for_another_base_is_a_user_error_and_leaves_model_alone(tmp_path):
    m, names = trained("qv")
    save(m, names, tmp_path / "ad")
    other = tiny_llama(0, hidden_size=48)
    with pytest.raises(UserError) as e:
        load_adapter(other, tmp_path / "ad")
    msg = str(e.value)
    assert "does not match the model" in msg and "lora_A.weight" in msg and "(4, 32)" in msg and "(4, 48)" in msg
    assert not list(lora_modules(other))
    # Keys for modules the model lacks (a deeper model's layer 2).
    deep, names = trained("qv", num_hidden_layers=3)
    save(deep, names, tmp_path / "deep")
    with pytest.raises(UserError, match="does not match the model.*layers.2"):
        load_adapter(tiny_llama(0), tmp_path / "deep")


def test_missing_and_unsafe_files_are_user_errors_naming_the_path(tmp_path):
    with pytest.raises(UserError, match="nope"):
        load_adapter(tiny_llama(0), tmp_path / "nope")
    m, names = trained("qv")
    ad = save(m, names, tmp_path / "ad")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        load_adapter(tiny_llama(0), ad)
    (ad / "adapter_model.bin").write_bytes(b"pickle would run code")
    with pytest.raises(UserError, match="only safetensors"):
        load_adapter(tiny_llama(0), ad)
    (ad / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(tiny_llama(0), ad)


@pytest.mark.parametrize("change, needle", [({"lora_bias": True}, "lora_bias"), ({"bias": "all"}, "bias"),
                                            ({"use_dora": True}, "no weight .*lora_magnitude_vector"),
                                            ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
                                            ({"layers_to_transform": "0"}, "layers_to_transform"),
                                            ({"peft_type": "IA3"}, "IA3"), ({"r": 0}, "'r'"),
                                            ({"target_modules": []}, "target_modules")])
def test_unsupported_or_bad_configs_are_refused(change, needle, tmp_path):
    m, names = trained("qv")
    ad = save(m, names, tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    fresh = tiny_llama(0)
    with pytest.raises(UserError, match=needle):
        load_adapter(fresh, ad)
    assert not list(lora_modules(fresh))


def test_save_refuses_a_merged_or_an_adapterless_model(tmp_path):
    from loralab.peft.merge import merge, unmerge

    m, _ = trained("qv")
    merge(m)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(m, tmp_path / "x", base_model_name_or_path="b")
    unmerge(m)
    with pytest.raises(ValueError, match="no LoRA modules"):
        save_adapter(tiny_llama(0), tmp_path / "x", base_model_name_or_path="b")
    assert not (tmp_path / "x" / "adapter_config.json").exists()
