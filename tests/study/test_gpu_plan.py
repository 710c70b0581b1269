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
