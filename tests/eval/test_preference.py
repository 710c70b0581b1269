"""Held-out preference accuracy (eval/preference.py) and whole dpo / orpo runs on the tiny model folder: the
summary and table carry it, resume is exact, the adapter loads in PEFT."""
import json

import pytest
import torch

from loralab.config import load_config
from loralab.data.formats import Example
from loralab.data.preference import PreferencePair, encode_pairs
from loralab.eval.preference import preference_metrics, table_lines
from loralab.pipeline import run_training
from loralab.summary import format_table
from tinymodels import tiny_llama, with_lora


def _cfg(folder, out, *extra):
    return load_config(None, [f"model.name={folder}", "data.tasks=[2da]", "data.n_train=40", "data.template=raw",
                              "eval.n=8", "train.max_steps=3", "train.batch_size=4", "train.progress=false",
                              "train.lr=1e-2", "train.precision=fp32", "train.objective=dpo",
                              f"output_dir={out}", *extra])


def _pairs(tok):
    pairs = [PreferencePair(Example(prompt=f"Q{a}:", response=f" {a}", kind="prompt"),
                            Example(prompt=f"Q{a}:", response=f" {a + 1}", kind="prompt")) for a in range(5)]
    return encode_pairs(pairs, tok, template="raw")[0]


def test_metrics_by_hand(tiny_tokenizer):
    from loralab.data.preference import collate_pairs
    from loralab.train.preference import sequence_logps

    model = with_lora(tiny_llama(0), seed=1)
    enc = _pairs(tiny_tokenizer)
    got = preference_metrics(model, enc, beta=0.5, batch_size=2, pad_id=tiny_tokenizer.pad_token_id)
    batch = collate_pairs(enc, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        policy, _ = sequence_logps(model.eval(), batch)
        ref, _ = sequence_logps(tiny_llama(0), batch)
    margin = 0.5 * ((policy[:5] - ref[:5]) - (policy[5:] - ref[5:]))
    assert got["n"] == 5
    assert got["accuracy"] == pytest.approx(float((policy[:5] > policy[5:]).float().mean()))
    assert got["reward_margin"] == pytest.approx(float(margin.mean()), abs=1e-6)
    assert got["reward_accuracy"] == pytest.approx(float((margin > 0).float().mean()))
    base = preference_metrics(tiny_llama(0), enc, beta=0.5, batch_size=2, pad_id=tiny_tokenizer.pad_token_id)
    assert base["reward_margin"] == 0 and base["reward_accuracy"] == 0  # no LoRA: the reference is the model
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec

    fresh = tiny_llama(0)
    inject(fresh, "all-linear", LoraSpec(r=4, alpha=8))  # B = 0: the base itself, scored without LoRA's matmuls
    assert preference_metrics(fresh, enc, beta=0.5, batch_size=2, pad_id=tiny_tokenizer.pad_token_id) == base


def test_table_lines():
    summary = {"preference": {"2da": {"before": {"accuracy": 0.5}, "after": {"accuracy": 0.75, "reward_margin": 0.1,
                                                                             "reward_accuracy": 0.8, "n": 4}}}}
    text = "\n".join(table_lines(summary))
    assert "50.0%" in text and "75.0%" in text and "+25.0 pts" in text and "+0.100" in text


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_run_reports_preference_accuracy_and_the_adapter_loads_in_peft(objective, tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    out = tmp_path / objective
    cfg = _cfg(tiny_folder, out, f"train.objective={objective}")
    summary = run_training(cfg, quiet=True)
    part = summary["preference"]["2da"]
    assert part["before"]["n"] == part["after"]["n"] == 8
    assert part["before"]["reward_margin"] == 0  # the base scored against itself
    assert 0 <= part["after"]["accuracy"] <= 1
    assert "held-out preference" in format_table(summary, cfg)
    assert json.loads((out / "summary.json").read_text())["preference"] == summary["preference"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_accuracy" in s for s in steps if "loss" in s)
    assert summary["eval"]["2da"]["test_loss"] > 0  # the held-out answers' token loss still reported
    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_folder)(input_ids=ids).logits
    assert (theirs - plain).abs().max() > 0  # the trained adapter changes the model


def test_resume_is_exact(tiny_folder, tmp_path):
    whole = run_training(_cfg(tiny_folder, tmp_path / "whole", "train.max_steps=4"), quiet=True)
    from loralab.train import loop

    cfg = _cfg(tiny_folder, tmp_path / "cut", "train.max_steps=4", "train.save_every=2")
    real, calls = loop.train_step, []

    def stop_after_two(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    loop.train_step = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, quiet=True)
    finally:
        loop.train_step = real
    resumed = run_training(cfg, quiet=True)
    assert resumed["resumed_from_step"] == 2
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert resumed["preference"] == whole["preference"]


def test_qlora_dpo_runs(tiny_folder, tmp_path):
    summary = run_training(_cfg(tiny_folder, tmp_path / "q", "model.quant=nf4", "lora.targets=[q_proj,v_proj]"),
                           quiet=True)
    assert summary["preference"]["2da"]["after"]["n"] == 8
    assert summary["final_train_loss"] > 0
