"""End-to-end runs on a tiny model saved as an HF folder: files, summary, PEFT interop, CLI."""
import json

import pytest
import torch

from loralab.cli import main
from loralab.config import load_config
from loralab.pipeline import run_training


def _cfg(folder, out, *extra):
    return load_config(None, [f"model.name={folder}", "data.tasks=[2da]", "data.n_train=48",
                              "data.template=raw", "eval.n=6", "train.max_steps=3", "train.batch_size=4",
                              "train.progress=false", "train.lr=1e-2", "train.precision=fp32",
                              f"output_dir={out}", *extra])


def test_test_loss_is_skipped_when_switched_off(tiny_folder, tmp_path, monkeypatch):
    import loralab.run as pipeline

    calls = []
    real = pipeline.test_losses
    monkeypatch.setattr(pipeline, "test_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    on = run_training(_cfg(tiny_folder, tmp_path / "on", "eval.before=false"), quiet=True)
    off = run_training(_cfg(tiny_folder, tmp_path / "off", "eval.before=false", "eval.test_loss=false"), quiet=True)
    assert calls == [1]  # one forward over the held-out answers, in the first run only
    assert on["eval"]["2da"]["test_loss"] > 0 and off["eval"]["2da"]["test_loss"] is None
    assert off["eval"]["2da"]["after"] == on["eval"]["2da"]["after"]  # exact match is unaffected


def test_run_writes_every_artifact(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_folder, out)
    summary = run_training(cfg, quiet=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if "loss" in s]
    assert [s["step"] for s in train_steps] == [1, 2, 3]
    assert {"step", "loss", "lr", "tokens", "elapsed_s"} <= set(train_steps[0])
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("runtime_s", "train_tokens", "tokens_per_s", "peak_memory_bytes", "trainable_params",
                "total_params", "final_train_loss", "final_val_loss", "eval"):
        assert on_disk[key] is not None, key
    assert set(on_disk["eval"]["2da"]) >= {"before", "after"}
    from loralab.model.convert import NAMES

    assert on_disk["converters"] == {"applied": list(NAMES), "declined": {}}  # a Llama takes every rewrite
    assert 0 < on_disk["trainable_params"] < on_disk["total_params"]
    assert on_disk["peak_memory_bytes"] > 10 * 2**20
    assert summary["train_tokens"] == train_steps[-1]["tokens"]
    # the analytic breakdown beside the measured peak: its parts add up to the estimated peak
    parts = on_disk["memory_breakdown"]
    assert set(parts) == {"estimated_peak_bytes", "frozen_weights", "trainable_weights", "gradients",
                          "optimizer_state", "activations", "other"}
    assert parts["estimated_peak_bytes"] == sum(v for k, v in parts.items() if k != "estimated_peak_bytes")
    # AdamW: two fp32 moments per fp32 LoRA factor; no LoRA gradient exists yet when backward starts
    assert parts["optimizer_state"] == 2 * parts["trainable_weights"] and parts["gradients"] == 0
    from loralab.summary import format_table

    assert "optimizer state" in format_table(summary, cfg) and "activations" in format_table(summary, cfg)


def test_peft_loads_the_runs_adapter_from_its_recorded_base(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from loralab.inference import load_with_adapter
    from peft import PeftModel

    out = tmp_path / "run"
    run_training(_cfg(tiny_folder, out, "lora.dropout=0.0"), quiet=True)
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])  # transformers alone
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours, _ = load_with_adapter(None, str(out / "adapter"))
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_cli_writes_a_folder_transformers_loads_alone(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from loralab.inference import load_with_adapter

    out = tmp_path / "run"
    run_training(_cfg(tiny_folder, out, "lora.dropout=0.0"), quiet=True)
    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours, _ = load_with_adapter(None, str(out / "adapter"))
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_cli_bad_key_is_one_line_exit_2(capsys):
    assert main(["train", "configs/demo.yaml", "lora.rr=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "loralab: error: unknown config key 'lora.rr' (did you mean r?)"


def test_cli_train_prints_table(tiny_folder, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model:\n  name: {tiny_folder}\noutput_dir: {tmp_path / 'o'}\n")
    code = main(["train", str(cfg_file), "data.tasks=[2da]", "data.n_train=24", "eval.n=4", "train.max_steps=2",
                 "train.progress=false", "data.template=raw", "train.batch_size=4"])
    assert code == 0
    printed = capsys.readouterr()
    table = printed.out
    assert "tokens/s" in table and "peak memory" in table and "2da" in table
    assert "loralab: model rewrites: lean_rmsnorm, lean_swiglu" in printed.err  # one line: applied and declined


def test_multi_epoch_on_small_data_warns():
    from loralab.summary import epoch_warnings

    cfg = load_config(None, ["train.batch_size=10", "train.epochs=3"])
    (w,) = epoch_warnings(100, cfg)
    assert "3.0 epochs over 100" in w and "train.eval_every" in w
    assert epoch_warnings(100, load_config(None, ["train.batch_size=10", "train.epochs=1"])) == []
    assert epoch_warnings(50_000, load_config(None, ["train.epochs=2"])) == []
    # one epoch rounded up to whole steps (7 x 16 = 112 of 100) is still one epoch
    assert epoch_warnings(100, load_config(None, ["train.batch_size=16", "train.epochs=1"])) == []
    # max_steps past one epoch counts too
    assert epoch_warnings(100, load_config(None, ["train.batch_size=10", "train.max_steps=25"]))


def test_validation_during_training_scores_tasks_and_keeps_the_best_adapter(tiny_folder, tmp_path):
    out = tmp_path / "run"
    summary = run_training(_cfg(tiny_folder, out, "train.max_steps=4", "train.eval_every=2"), quiet=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in lines if "val_loss" in v]
    assert [v["step"] for v in vals] == [2, 4]
    assert all(set(v["accuracy"]) == {"2da"} and 0 <= v["accuracy"]["2da"] <= 1 for v in vals)
    best = min(vals, key=lambda v: v["val_loss"])
    assert summary["best_step"] == best["step"] and summary["best_val_loss"] == best["val_loss"]
    assert (out / "best_adapter" / "adapter_model.safetensors").is_file()
    assert summary["best_adapter_dir"] == str(out / "best_adapter")


def test_precision_auto_is_resolved_once_and_the_callers_config_is_left_alone(tiny_folder, tmp_path):
    from loralab.train.precision import resolve_precision

    cfg = _cfg(tiny_folder, tmp_path / "run", "train.precision=auto", "eval.before=false", "train.max_steps=1")
    summary = run_training(cfg, quiet=True)
    resolved = resolve_precision("auto", "cpu")
    assert cfg.train.precision == "auto"  # not overwritten
    assert summary["precision"] == resolved
    assert load_config(tmp_path / "run" / "config.yaml").train.precision == resolved  # what the run used


def test_users_alpaca_file_on_the_demo_config_just_trains(tiny_folder, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}", "input": "", "output": str(2 * i + 1)})
                            + "\n" for i in range(12)))
    out = tmp_path / "run"
    code = main(["train", "configs/demo.yaml", f"data.path={data}", f"model.name={tiny_folder}", f"output_dir={out}",
                 "train.max_steps=2", "train.batch_size=4", "train.progress=false", "eval.n=4"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_demo_configs_template_renders_its_tasks_exactly_as_raw(tiny_tokenizer):
    from loralab.data.prompts import render_example, render_prompt
    from loralab.data.tasks import make_task

    cfg = load_config("configs/demo.yaml")
    train, test = make_task("2ds", 5, 5, cfg.data.seed)
    for ex in train + test:
        assert render_example(ex, tiny_tokenizer, template=cfg.data.template) == \
            render_example(ex, tiny_tokenizer, template="raw")
        assert render_prompt(ex, tiny_tokenizer, template=cfg.data.template) == ex.prompt


def test_the_summary_and_table_report_how_many_held_out_generations_stop(tiny_folder, tmp_path):
    from loralab.summary import format_table

    cfg = _cfg(tiny_folder, tmp_path / "tasks")
    s = run_training(cfg, quiet=True)  # task runs: exact match's own generations are counted
    assert s["stops"]["n"] == 6 and s["stops"]["held_out"] == "2da" and 0 <= s["stops"]["stopped"] <= 6
    assert s["stops"]["budget"] == "8 tokens"
    assert f"stops on EOS    {s['stops']['stopped']}/6 held-out generations (2da; within 8 tokens)" \
        in format_table(s, cfg)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": f" a{i}"}) + "\n" for i in range(40)))
    s = run_training(_cfg(tiny_folder, tmp_path / "file", f"data.path={data}", "data.val_fraction=0.25",
                          "eval.n=4"), quiet=True)  # a data file: the validation examples are generated
    assert s["stops"]["n"] == 4 and s["stops"]["held_out"] == "validation"
    assert json.loads((tmp_path / "file" / "summary.json").read_text())["stops"] == s["stops"]


def test_data_that_would_teach_the_model_never_to_stop_is_warned_about_before_training(tiny_folder, tmp_path,
                                                                                     capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q:", "response": " " + "word " * 20}) + "\n" for _ in range(8)))
    code = main(["train", f"data.path={data}", f"model.name={tiny_folder}", f"output_dir={tmp_path / 'o'}",
                 "data.max_seq_len=16", "train.max_steps=1", "train.batch_size=4", "train.progress=false",
                 "data.val_fraction=0"])
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    warning = [l for l in err if "learn not to stop" in l]
    assert warning == ["loralab: warning: only 0 of 8 training examples end with a learned EOS / end-of-turn "
                       "token (8 were cut by data.max_seq_len=16): the model will learn not to stop"]
    first_training_line = min(i for i, l in enumerate(err) if "training examples (" in l)
    assert err.index(warning[0]) > first_training_line  # with the data report, before training starts
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["warnings"] == [warning[0].removeprefix("loralab: warning: ")]


def test_training_on_a_parquet_file_through_data_columns(tiny_folder, tmp_path):
    import datasets

    rows = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(16)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    out = tmp_path / "run"
    assert main(["train", f"model.name={tiny_folder}", f"data.path={tmp_path / 'qa.parquet'}",
                 "data.columns={instruction: question, output: answer}", "train.max_steps=2", "train.batch_size=4",
                 "train.progress=false", "eval.n=2", f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 16 - round(0.05 * 16) and summary["steps"] == 2
    assert load_config(out / "config.yaml").data.columns == {"instruction": "question", "output": "answer"}


def test_a_run_with_every_variant_saves_an_adapter_peft_loads_on_the_original_base(tiny_folder, tmp_path):
    """DoRA + PiSSA + rsLoRA + rank/alpha patterns + two layers' modules + LoRA+: the run trains,
    records its settings, and its adapter (converted for the original base) loads in PEFT and
    merges (loralab merge) with the same logits."""
    from transformers import AutoModelForCausalLM

    from loralab.inference import load_with_adapter
    from peft import PeftModel

    out = tmp_path / "run"
    summary = run_training(_cfg(tiny_folder, out, "lora.dropout=0.0", "lora.use_dora=true", "lora.init=pissa",
                                "lora.use_rslora=true", "lora.r=4", "lora.rank_pattern={q_proj: 8}",
                                "lora.alpha_pattern={v_proj: 16}", "lora.layers=[1]",
                                "train.loraplus_lr_ratio=4"), quiet=True)
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["layers_to_transform"] == [1]
    assert (cfg["r"], cfg["rank_pattern"]) == (8, {"q_proj": 16})  # converted: rank doubled
    assert summary["trainable_params"] > 0 and summary["memory_breakdown"]["estimated_peak_bytes"] > 0
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ours, _ = load_with_adapter(None, str(out / "adapter"))
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        want = peft_model(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=1e-5)
        assert (want - AutoModelForCausalLM.from_pretrained(tiny_folder)(ids).logits).abs().max() > 1e-4
    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_variant_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does(tiny_folder, tmp_path, monkeypatch):
    """PiSSA redoes its init on resume (same seed, same residual base); LoRA+'s two parameter
    groups and DoRA's magnitudes come back from the checkpoint."""
    import pytest

    from loralab import pipeline
    from loralab.errors import UserError
    from loralab.peft.adapter_files import read_weights

    extra = ("lora.use_dora=true", "lora.init=pissa_niter_2", "train.loraplus_lr_ratio=4", "train.max_steps=4",
             "eval.before=false")
    run_training(_cfg(tiny_folder, tmp_path / "straight", *extra), quiet=True)
    polls = iter([False, True])  # stop after the second step
    monkeypatch.setattr(pipeline.stop_flag, "is_set", lambda: next(polls, False))
    with pytest.raises(UserError, match="interrupted at step 2"):
        run_training(_cfg(tiny_folder, tmp_path / "resumed", *extra), quiet=True)
    run_training(_cfg(tiny_folder, tmp_path / "resumed", *extra), quiet=True)
    a, b = read_weights(tmp_path / "straight/adapter"), read_weights(tmp_path / "resumed/adapter")
    assert a.keys() == b.keys() and any("magnitude" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_suite_families_held_out_and_test_loss_match_peft(tiny_folder, tmp_path):
    """Instruction-suite families, one never trained on: the summary marks it, validation along the
    way skips exact match (eval.with_validation=false), and each task's test loss is the mean token
    loss of its held-out answers under the saved adapter, as PEFT computes it."""
    from transformers import AutoModelForCausalLM

    from loralab.data.prompts import encode_all
    from loralab.data.tasks import make_task
    from peft import PeftModel

    out = tmp_path / "run"
    cfg = _cfg(tiny_folder, out, "data.tasks=[add, reverse_word]", "eval.tasks=[add, divide]", "data.n_train=24",
               "data.template=auto", "lora.dropout=0.0", "train.eval_every=2", "train.max_steps=4",
               "eval.with_validation=false", "eval.before=false")
    summary = run_training(cfg, quiet=True)
    assert {k: v["trained"] for k, v in summary["eval"].items()} == {"add": True, "divide": False}
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals if "val_loss" in v] == [2, 4] and not any("accuracy" in v for v in vals)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_folder), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    from loralab.io.models import load_tokenizer

    tok = load_tokenizer(str(tiny_folder))
    for task in ("add", "divide"):
        test = make_task(task, 24, cfg.eval.n, cfg.data.seed)[1]
        encoded = encode_all(test, tok, template="auto", system_prompt=cfg.data.system_prompt,
                             max_seq_len=cfg.data.max_seq_len)[0]
        total, count = 0.0, 0
        with torch.no_grad():
            for e in encoded:
                labels = torch.tensor([e.labels])
                n = int((labels[:, 1:] != -100).sum())
                total += float(peft_model(torch.tensor([e.input_ids]), labels=labels).loss) * n
                count += n
        assert summary["eval"][task]["test_loss"] == pytest.approx(total / count, rel=1e-4), task


@pytest.mark.parametrize("layers, shown", [(None, ""), (7, " layers=7"), ([3, 1, 2], " layers=1-3"),
                                           ([1, 2], " layers=1,2"), ([0, 2, 5], " layers=0,2,5")])
def test_the_table_names_the_decoder_layers_lora_was_given(layers, shown):
    from loralab.summary import _layers

    cfg = load_config("configs/demo.yaml", [f"lora.layers={json.dumps(layers)}"] if layers is not None else [])
    if layers is None:
        cfg.lora.layers = None
    assert _layers(cfg) == shown


def test_make_demo_trains_the_top_20_layers_and_the_demo_config_every_layer():
    from pathlib import Path

    from loralab.summary import _layers

    make = (Path(__file__).parents[1] / "Makefile").read_text()
    layers = next(l.split("=", 1)[1].strip() for l in make.splitlines() if l.startswith("DEMO_LAYERS ="))
    assert '"lora.layers=$(DEMO_LAYERS)"' in make
    assert _layers(load_config("configs/demo.yaml", [f"lora.layers={layers}"])) == " layers=10-29"
    assert load_config("configs/demo.yaml").lora.layers is None  # any model, studies: every layer


def test_converters_off_trains_the_model_as_transformers_computes_it_and_auto_gives_the_same_step(tiny_folder,
                                                                                                  tmp_path):
    # the plain path is one override away; one SGD step (B then holds the gradient) agrees with the default's
    step = ["lora.dropout=0", "train.optimizer=sgd", "train.momentum=0", "train.lr=1", "train.scheduler=constant",
            "train.max_steps=1", "train.max_grad_norm=null", "eval.before=false", "eval.n=0"]
    adapters = {}
    for choice in ("off", "auto"):
        summary = run_training(_cfg(tiny_folder, tmp_path / choice, f"model.converters={choice}", *step), quiet=True)
        assert (summary["converters"]["applied"] == []) == (choice == "off")
        from safetensors.torch import load_file

        adapters[choice] = load_file(str(tmp_path / choice / "adapter" / "adapter_model.safetensors"))
    assert adapters["off"].keys() == adapters["auto"].keys()
    for key, off in adapters["off"].items():
        assert float((adapters["auto"][key] - off).abs().max()) <= 1e-5 * float(off.abs().max()), key
