"""--scale gpu: the plan of memory and time printed before anything runs."""
import pytest

from loralab.cli import main
from loralab.errors import UserError
from loralab.study import spec
from loralab.study.gpu_plan import plan_rows, plan_text


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
    with pytest.raises(UserError, match=r"--scale gpu plan: model.name=.*nothing"):
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
