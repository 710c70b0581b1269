"""End-to-end runs on a tiny GPT-2 folder (Conv1D layers, weights stored (in, out)): train, QLoRA, and what
`loralab check` says. PEFT loading, merge and the GGUF refusal are the architecture matrix's (tests/model/
test_matrix.py, gpt2)."""
import json

import pytest
import torch

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
