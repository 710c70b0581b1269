"""A study's plan of memory and time, printed before anything runs: on a GPU, and on this CPU."""
import pytest

from loralab.cli import main
from loralab.errors import UserError
from loralab.memory import cpu_time
from loralab.memory.throughput import Device
from loralab.study import sequential, spec
from loralab.study.plan import plan_rows, plan_text, total_seconds


def test_the_plan_lists_every_cell_and_sweep_point(tiny_folder):
    study = spec.load_study("targets", scale="gpu", overrides=[f"model.name={tiny_folder}", "data.n_train=20"])
    rows = plan_rows(study, gpu="H100")
    assert [r["cell"] for r in rows[:3]] == ["qv-r16 @ lr-0.001", "qv-r16 @ lr-0.002", "qv-r16 @ lr-0.004"]
    assert len(rows) == 9 and sum(r["runs"] for r in rows) == spec.count_runs(study) == 15
    # 17 families x 20 examples, 2% for validation, batch 1 x 128 accumulated: 3 steps of the one epoch
    assert {r["steps"] for r in rows} == {3} and all(r["peak_gb"] > 0 and r["train_s"] > 0 for r in rows)
    text = plan_text(study, gpu="H100")
    assert text.startswith("plan on one H100 (estimates, not measurements") and "in all: 15 runs" in text


def test_the_dry_run_prints_the_plan_and_a_missing_model_is_refused(tiny_folder, capsys):
    assert main(["study", "qlora", "--scale", "gpu", "--dry-run", f"model.name={tiny_folder}", "data.n_train=20"]) == 0
    out = capsys.readouterr().out
    assert "study qlora (scale gpu)" in out and "plan on one" in out and "peak GB" in out
    assert main(["study", "qlora", "--scale", "gpu", "--dry-run"]) == 2
    assert "--scale gpu needs the model: add model.name=" in capsys.readouterr().err


def test_a_model_that_is_not_a_folder_is_named(tmp_path):
    study = spec.load_study("qlora", scale="gpu", overrides=[f"model.name={tmp_path / 'nothing'}"])
    with pytest.raises(UserError, match=r"study plan: model.name=.*nothing"):
        plan_rows(study)


def test_a_plan_needs_only_the_config(tmp_path, capsys):
    """Issue 44: a bundled config name (as `loralab estimate` takes it) and a folder holding only
    config.json both plan; tokens are then counted from characters, and the plan says so."""
    import shutil

    from loralab.memory.arch import resolve_model_config

    assert main(["study", "qlora", "--scale", "gpu", "--dry-run", "model.name=llama-2-7b", "data.n_train=20"]) == 0
    out = capsys.readouterr().out
    assert "plan on one" in out and "tokens counted as 4 characters each" in out
    gb = _plan_gb("llama-2-7b")
    assert len(gb) == 2 and 5 < gb[1] < gb[0] < 40  # a 7B model: NF4 below bf16, both in the GPU range
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text(__import__("json").dumps(resolve_model_config("llama-2-7b")))
    study = spec.load_study("qlora", scale="gpu", overrides=[f"model.name={folder}", "data.n_train=20"])
    rows = plan_rows(study, gpu="H100")
    assert [round(r["peak_gb"], 3) for r in rows] == [round(g, 3) for g in _plan_gb("llama-2-7b")]
    assert all(r["approx_tokens"] for r in rows)
    shutil.rmtree(folder)


def _plan_gb(name):
    study = spec.load_study("qlora", scale="gpu", overrides=[f"model.name={name}", "data.n_train=20"])
    return [r["peak_gb"] for r in plan_rows(study, gpu="H100")]


def test_a_folder_with_a_tokenizer_counts_real_tokens(tiny_folder):
    study = spec.load_study("qlora", scale="gpu", overrides=[f"model.name={tiny_folder}", "data.n_train=20"])
    assert not any(r["approx_tokens"] for r in plan_rows(study, gpu="H100"))


FIXED = Device("a fixed CPU", 10e9, 10e9, 0.5, 1.0)  # no probe: the same numbers on every machine


def test_a_cpu_plan_evaluates_only_the_chosen_sweep_point_and_counts_every_forward(tiny_folder, monkeypatch):
    monkeypatch.setattr("loralab.study.plan.cpu_device", lambda precision, threads: FIXED)
    study = spec.load_study("targets", overrides=[f"model.name={tiny_folder}", "data.n_train=20"])
    rows = plan_rows(study, cpu_threads=1)
    assert [(r["runs"], r["evaluated"]) for r in rows[:3]] == [(3, 3), (1, 0), (1, 0)]  # swept: 5 runs, 3 evaluated
    assert all(r["gpu"] == "a fixed CPU" and r["train_s"] > 0 and r["eval_s"] > 0 for r in rows)
    one = rows[0]
    assert total_seconds(rows[:3], 10.0) == pytest.approx(5 * (one["train_s"] + 10.0) + 3 * one["eval_s"])
    # 1,000 more held-out items are 1,000 more forwards of the mean example, at the forward rate
    more = plan_rows(spec.load_study("targets", overrides=[f"model.name={tiny_folder}", "data.n_train=20",
                                                           "eval.loss_items=2020"]), cpu_threads=1)[0]
    from loralab.memory.arch import resolve_model_config
    from loralab.memory.throughput import forward_flops_per_token

    per_item = one["mean_tokens"] * forward_flops_per_token(resolve_model_config(tiny_folder), one["mean_tokens"])
    assert more["eval_s"] - one["eval_s"] == pytest.approx(1000 * per_item / FIXED.flops)
    assert more["train_s"] == one["train_s"]
    text = plan_text(study, cpu_threads=1, parallel=2, rows=rows)
    assert text.startswith("plan on a fixed CPU (estimates") and "of CPU time one after another, about" in text
    assert "at --parallel 2" in text and "    -\n" in text  # a sweep point that only validates has no evaluation


def test_the_cpu_rate_is_measured_once_per_precision_and_threads():
    rate = cpu_time.measure_flops(seconds=0.05)
    assert 1e8 < rate < 1e14  # a CPU thread: between 0.1 GFLOP/s and 100 TFLOP/s
    cpu_time.cpu_device.cache_clear()
    first = cpu_time.cpu_device("fp32", 1)
    assert cpu_time.cpu_device("fp32", 1) is first and "fp32" in first.label and "GFLOP/s measured" in first.label


def test_until_decided_says_before_it_starts_when_this_machine_pays_for_no_round():
    study = spec.load_study("qlora")
    seq = sequential.sequential_plan(study, 8)
    slow = sequential.describe_plan(seq, 45 * 60, "~5 min", {"first_s": 50 * 60, "round_s": 20 * 60})
    assert "about 50 min here, estimated; ~5 min on the CPU the preset was timed on" in slow
    assert "unlikely to pay for a round: about 70 min would pay for one" in slow
    fast = sequential.describe_plan(seq, 45 * 60, "~5 min", {"first_s": 10 * 60, "round_s": 5 * 60})
    assert "about 10 min here" in fast and "unlikely" not in fast
    assert "here" not in sequential.describe_plan(seq, 45 * 60, "~5 min")


def test_a_cpu_study_without_its_model_still_runs_and_says_why_there_is_no_plan(tmp_path, capsys):
    from loralab.cli import main

    assert main(["study", "qlora", "--dry-run", f"model.name={tmp_path / 'nothing'}"]) == 0
    captured = capsys.readouterr()
    assert "study qlora (scale cpu)" in captured.out and "no time plan:" in captured.err


def test_preference_runs_plan_two_rows_an_example_and_dpo_its_reference(tiny_folder, monkeypatch):
    monkeypatch.setattr("loralab.study.plan.cpu_device", lambda precision, threads: FIXED)
    study = spec.load_study("preference", overrides=[f"model.name={tiny_folder}", "data.n_train=40"])
    rows = {r["cell"]: r for r in plan_rows(study, cpu_threads=1)}
    assert rows["orpo"]["tokens"] == rows["sft-dpo"]["tokens"] == 2 * rows["sft"]["tokens"]  # chosen + rejected
    assert rows["sft-dpo"]["train_s"] > rows["orpo"]["train_s"] > rows["sft"]["train_s"]  # DPO: + reference forwards
    assert rows["sft"]["eval_s"] == rows["orpo"]["eval_s"]  # the same held-out questions and pairs
