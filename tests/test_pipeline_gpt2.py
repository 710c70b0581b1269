"""End-to-end runs on a tiny GPT-2 folder (Conv1D layers, weights stored (in, out)): train, save an
adapter PEFT loads, merge into a folder transformers loads, refuse GGUF export in one line."""
import json

import pytest
import torch

from loralab.cli import main
from loralab.config import load_config
from loralab.pipeline import run_training
from tinymodels import save_tiny_gpt2_folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2_folder(tmp_path_factory.mktemp("tiny-gpt2"))


def _cfg(folder, out, *extra):
    return load_config(None, [f"model.name={folder}", "data.tasks=[2da]", "data.n_train=48",
                              "data.template=raw", "eval.n=6", "eval.before=false", "train.max_steps=3",
                              "train.batch_size=4", "train.progress=false", "train.lr=1e-2",
                              "train.precision=fp32", "lora.targets=all-linear", "lora.dropout=0.0",
                              f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def run(gpt2_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2-run")
    summary = run_training(_cfg(gpt2_folder, out), quiet=True)
    return out, summary


def test_all_linear_trains_every_conv1d_and_saves_a_fan_in_fan_out_adapter(run):
    out, summary = run
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps if "loss" in s)
    # r=8 on c_attn (64 -> 192), attn.c_proj (64 -> 64), c_fc (64 -> 256), mlp.c_proj (256 -> 64), two layers
    assert summary["trainable_params"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and sorted(cfg["target_modules"]) == ["c_attn", "c_fc", "c_proj"]


def test_peft_and_loralab_load_the_runs_adapter_with_the_same_logits(run):
    from transformers import AutoModelForCausalLM

    from loralab.inference import load_with_adapter
    from peft import PeftModel

    out, _ = run
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])  # transformers alone
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours, _ = load_with_adapter(None, str(out / "adapter"))
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_cli_writes_a_gpt2_folder_transformers_loads_alone(run, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from loralab.inference import load_with_adapter

    out, _ = run
    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(merged.get_submodule("transformer.h.0.attn.c_attn"), Conv1D)
    ours, _ = load_with_adapter(None, str(out / "adapter"))
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_gguf_export_of_a_gpt2_adapter_is_refused_in_one_line(run, tmp_path, capsys):
    out, _ = run
    assert main(["export", str(out / "adapter"), "--gguf", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "a.gguf").exists()


def test_qlora_over_conv1d_trains_and_saves(gpt2_folder, tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    import loralab.peft.quant as quant

    counts, real = [], quant.quantize_model
    monkeypatch.setattr(quant, "quantize_model", lambda *a, **k: counts.append(real(*a, **k)) or counts[-1])
    out = tmp_path / "qlora"
    summary = run_training(_cfg(gpt2_folder, out, "model.quant=nf4", "eval.n=2", "eval.test_loss=false"), quiet=True)
    assert counts == [8]  # every targeted Conv1D went to NF4
    assert summary["final_train_loss"] is not None
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True


def test_check_says_loralab_and_peft_load_the_gpt2_adapter(run):
    from loralab.peft.check import runtime_support

    out, _ = run
    rows = {r["runtime"]: r for r in runtime_support(out / "adapter")}
    assert rows["loralab"]["loads"] and rows["PEFT"]["loads"], rows
