"""LoRA on fused MoE expert weights (lora.target_parameters), with PEFT's ParamWrapper as the oracle:
the same forward and gradients, adapters each side loads, merged weights transformers loads alone."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from loralab.errors import UserError
from loralab.peft.adapters import load_adapter, save_adapter
from loralab.peft.experts import LoRAExperts, all_linear_note, expert_modules, expert_tensors, inject_experts
from loralab.peft.inject import inject, lora_state_dict
from loralab.peft.lora import LoraSpec, lora_modules
from loralab.peft.merge import merge, merge_and_unload, unmerge
from tinymodels import MOE_KINDS, tiny_moe

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_model(base, r=2, alpha=4, targets=("q_proj",), parameters=EXPERTS, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                          target_modules=list(targets),
                                                          target_parameters=list(parameters), **kw))


def ours_like(base, pm, seed=1, r=2, alpha=4, targets=("q_proj",), **kw):
    """loralab's model with PEFT's A and, in both, the same random non-zero B."""
    ours = copy.deepcopy(base)
    spec = LoraSpec(r=r, alpha=alpha, dropout=0.0, **kw)
    inject(ours, list(targets), spec)
    inject_experts(ours, EXPERTS, spec)
    theirs = dict(pm.named_parameters())
    g = torch.Generator().manual_seed(seed)
    pairs = [(f"{p}.lora_A.default.weight", a, f"{p}.lora_B.default.weight", b)
             for p, a, b, _ in expert_tensors(ours).values()]
    pairs += [(f"{n}.lora_A.default.weight", m.lora_A.weight, f"{n}.lora_B.default.weight", m.lora_B.weight)
              for n, m in lora_modules(ours)]
    with torch.no_grad():
        for ka, a, kb, b in pairs:
            pa, pb = theirs["base_model.model." + ka], theirs["base_model.model." + kb]
            assert pa.shape == a.shape and pb.shape == b.shape
            a.copy_(pa)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            pb.copy_(b)
    return ours, pairs, theirs


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_forward_gradients_and_an_sgd_step_equal_peft(kind):
    base = tiny_moe(kind)
    pm = peft_model(base)
    ours, pairs, theirs = ours_like(base, pm)
    lo, lp = ours(input_ids=IDS).logits, pm(input_ids=IDS).logits
    assert rel(lo, lp) < 1e-5 and rel(lo, logits(base)) > 1e-3  # the update is really there
    lo.square().mean().backward()
    lp.square().mean().backward()
    for ka, a, kb, b in pairs:
        assert rel(a.grad, theirs["base_model.model." + ka].grad) < 1e-5, ka
        assert rel(b.grad, theirs["base_model.model." + kb].grad) < 1e-5, kb
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    assert sum(p.numel() for p in trainable(ours)) == sum(p.numel() for p in trainable(pm))
    for model in (ours, pm):
        torch.optim.SGD(trainable(model), lr=0.5).step()
    assert rel(logits(ours), logits(pm)) < 1e-5


@pytest.mark.filterwarnings("ignore:The following .*_pattern keys did not match")
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_peft_loads_our_adapter_with_its_own_keys_and_the_same_logits(kind, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    base = tiny_moe(kind)
    pm = peft_model(base, rank_pattern={"down_proj": 3}, alpha_pattern={"gate_up_proj": 6}, use_rslora=True)
    ours = copy.deepcopy(base)
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, use_rslora=True)
    per = lambda n: LoraSpec(r=3 if n.endswith("down_proj") else 2, alpha=6 if n.endswith("gate_up_proj") else 4,  # noqa: E731
                             dropout=0.0, use_rslora=True)
    inject(ours, ["q_proj"], spec)
    inject_experts(ours, EXPERTS, per)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=kind)
    cfg = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert cfg["target_parameters"] == sorted(EXPERTS) and cfg["lora_dropout"] == 0.0
    saved = load_file(tmp_path / "ad/adapter_model.safetensors")
    theirs = get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    assert rel(logits(loaded), logits(ours)) < 1e-5 and rel(logits(ours), logits(base)) > 1e-3
    mine = load_adapter(copy.deepcopy(base), tmp_path / "ad")  # and ours reads it back
    assert mine["target_parameters"] == sorted(EXPERTS)


def test_we_load_peft_adapter_experts_only(tmp_path):
    base = tiny_moe("qwen3_moe")
    pm = peft_model(base, targets=(), parameters=["experts.down_proj"])
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "peft")
    assert not list(lora_modules(ours)) and [m.names for _, m in expert_modules(ours)] == [["down_proj"]] * 2
    assert rel(logits(ours), logits(pm)) < 1e-5
    wrong = tiny_moe("qwen3_moe", num_experts=8)  # another base: a one-line mismatch, the model untouched
    with pytest.raises(UserError, match="does not match the model"):
        load_adapter(wrong, tmp_path / "peft")
    assert not list(expert_modules(wrong))


def test_merge_in_place_and_merge_and_unload_give_weights_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_moe("mixtral")
    ours, _, _ = ours_like(base, peft_model(base))
    want = logits(ours)
    before = ours.model.layers[0].mlp.experts.base.gate_up_proj.clone()
    merge(ours)
    assert rel(logits(ours), want) < 1e-5
    unmerge(ours)
    assert torch.allclose(ours.model.layers[0].mlp.experts.base.gate_up_proj, before, atol=1e-6)
    merge_and_unload(ours)
    assert not list(expert_modules(ours)) and not any(p.requires_grad for p in ours.parameters())
    ours.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel(logits(again), want) < 1e-5


def test_bad_targets_are_one_line_errors_and_leave_the_model_alone():
    m = tiny_moe("gpt_oss")
    for entries, words in ((["experts.nope"], "matches no parameter"),
                           (["experts.gate_up_proj_bias"], "only 3-D"),
                           (["router.weight"], "only 3-D")):
        with pytest.raises(UserError, match=words) as e:
            inject_experts(m, entries, LoraSpec(r=2, alpha=4, dropout=0.0))
        assert "lora.target_parameters" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="set lora.dropout=0"):
        inject_experts(m, EXPERTS, LoraSpec(r=2, alpha=4, dropout=0.1))
    assert not any(isinstance(x, LoRAExperts) for x in m.modules())


def test_config_refuses_what_peft_refuses_in_one_line():
    from loralab.config import from_dict

    ok = from_dict({"lora": {"target_parameters": EXPERTS, "dropout": 0.0}})
    assert ok.lora.target_parameters == EXPERTS and from_dict({}).lora.target_parameters == []
    for lora, words in (({"dropout": 0.05}, "lora.dropout=0.05"), ({"dropout": 0, "use_dora": True}, "DoRA"),
                        ({"dropout": 0, "init": "pissa"}, "lora.init=pissa"), ({"dropout": 0, "layers": [0]},
                                                                                "lora.layers"),
                        ({"dropout": 0, "target_parameters": [""]}, "list of parameter names")):
        with pytest.raises(UserError, match="lora.target_parameters") as e:
            from_dict({"lora": {"target_parameters": EXPERTS, **lora}})
        assert words in str(e.value)


def test_all_linear_names_the_expert_weights_it_leaves_out():
    m = tiny_moe("mixtral")
    note = all_linear_note(m, "all-linear", [])
    assert "lora.target_parameters" in note and "experts.down_proj, experts.gate_up_proj" in note
    assert "\n" not in note and "4 tensors" in note
    assert all_linear_note(m, "all-linear", EXPERTS) is None and all_linear_note(m, "qv", []) is None
    assert "2 tensors" in all_linear_note(m, "all-linear", ["model.layers.0.mlp.experts.down_proj",
                                                            "model.layers.1.mlp.experts.down_proj"])


def test_checkpoint_names_and_lora_state_are_the_trainable_factors():
    m = tiny_moe("mixtral")
    inject(m, "all-linear", LoraSpec(r=2, alpha=4, dropout=0.0))
    inject_experts(m, EXPERTS, LoraSpec(r=2, alpha=4, dropout=0.0))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.experts.lora_B.down_proj" in trainable  # "lora_B" in it: LoRA+ finds B
    assert set(lora_state_dict(m)) < trainable  # the linears' factors kept training
    assert len(trainable) == len(lora_state_dict(m)) + 2 * 2 * 2


def test_a_tiny_moe_run_trains_expert_lora_that_peft_and_merge_reproduce(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from loralab.cli import main
    from loralab.inference import load_with_adapter
    from peft import PeftModel
    from tinymodels import save_tiny_moe_folder

    folder = save_tiny_moe_folder(tmp_path / "model", "qwen3_moe")
    common = [f"model.name={folder}", "data.tasks=[2da]", "data.n_train=24", "data.template=raw", "eval.n=4",
              "eval.before=false", "train.max_steps=2", "train.batch_size=4", "train.progress=false",
              "train.precision=fp32", "train.lr=1e-2", "lora.dropout=0"]
    assert main(["train", *common, f"output_dir={tmp_path / 'plain'}"]) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if "lora.target_parameters" in line]
    assert len(note) == 1 and "warning" in note[0] and "experts.gate_up_proj" in note[0]
    out = tmp_path / "run"
    assert main(["train", *common, "lora.target_parameters=[experts.gate_up_proj,experts.down_proj]",
                 f"output_dir={out}"]) == 0
    printed = capsys.readouterr()
    assert "lora.target_parameters" not in printed.err  # nothing left out: no note
    assert "targets=all-linear + experts experts.gate_up_proj,experts.down_proj" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    plain = json.loads((tmp_path / "plain/summary.json").read_text())
    assert summary["trainable_params"] - plain["trainable_params"] == 2 * 8 * 4 * ((64 + 64) + (32 + 64))
    ours, _ = load_with_adapter(None, str(out / "adapter"))
    ids = IDS % 90 + 3  # within the tiny tokenizer's vocabulary
    trained = [m.lora_B[n] for _, m in expert_modules(ours) for n in m.names]
    assert len(trained) == 4 and all(b.abs().sum() > 0 for b in trained)  # the experts' B really trained
    base = AutoModelForCausalLM.from_pretrained(folder)
    theirs = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert rel(logits(theirs, ids), logits(ours, ids)) < 1e-5
    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel(logits(merged, ids), logits(ours, ids)) < 1e-5


def test_check_and_gguf_export_say_what_reads_an_expert_adapter(tmp_path):
    from loralab.inference import export_gguf
    from loralab.peft.check import runtime_support

    m = tiny_moe("mixtral")
    inject(m, ["q_proj"], LoraSpec(r=2, alpha=4, dropout=0.0))
    inject_experts(m, EXPERTS, LoraSpec(r=2, alpha=4, dropout=0.0))
    save_adapter(m, tmp_path / "ad", base_model_name_or_path="tiny-mixtral")
    rows = {r["runtime"]: r for r in runtime_support(tmp_path / "ad")}
    assert rows["loralab"]["loads"] and rows["PEFT"]["loads"] and "target_parameters" in rows["PEFT"]["why"]
    assert not rows["GGUF (llama.cpp)"]["loads"] and "fused expert" in rows["GGUF (llama.cpp)"]["why"]
    with pytest.raises(UserError, match="fused expert weights") as e:
        export_gguf(str(tmp_path / "ad"), lora_out=str(tmp_path / "a.gguf"))
    assert "\n" not in str(e.value) and not (tmp_path / "a.gguf").exists()
