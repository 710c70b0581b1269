"""The run object's order (run.py): the config and the data are validated (built, encoded,
pre-flighted) before the output folder is created or locked, so bad input changes nothing in it."""
import json

import pytest

from cli_cases import config_with, digest, run_cli, write


def _lock_refused(*a, **k):
    raise AssertionError("the output folder was locked before the data were validated")


BAD_DATA = {
    "missing-file": lambda tmp: {"path": str(tmp / "nowhere.jsonl")},
    "bad-record": lambda tmp: {"path": str(write(tmp / "bad.jsonl", '{"prompt": "1+1", "response": 2}\n{"x": 1}\n')),
                               "tasks": None},
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_against_an_existing_run_folder_touches_nothing(case, untouched, tiny_folder, tmp_path, capsys,
                                                                 monkeypatch):
    import loralab.run as run

    monkeypatch.setattr(run, "output_lock", _lock_refused)
    monkeypatch.setattr(run, "prepare_output_dir", _lock_refused)
    names = sorted(p.name for p in untouched.iterdir())
    before = digest(untouched)
    cfg = config_with(tmp_path, tiny_folder, untouched, data=BAD_DATA[case](tmp_path))
    run_cli(capsys, "train", cfg, expect=["data"])
    assert digest(untouched) == before and sorted(p.name for p in untouched.iterdir()) == names


def test_bad_data_creates_no_output_folder(tiny_folder, tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    cfg = write(tmp_path / "c.yaml", json.dumps({"model": {"name": str(tiny_folder)}, "output_dir": str(out),
                                                 "data": {"path": str(tmp_path / "nowhere.jsonl")}}))
    run_cli(capsys, "train", cfg, expect=["nowhere.jsonl"])
    assert not (tmp_path / "deep").exists()


def test_a_run_logs_where_tensorboard_and_mlflow_write(tiny_folder, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from loralab.cli import main

    out = tmp_path / "run"
    cfg = config_with(tmp_path, tiny_folder, out, train={"report_to": ["jsonl", "tensorboard", "mlflow"],
                                                         "max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert f"loralab: TensorBoard event files in {out / 'tensorboard'} (view: tensorboard --logdir" in err
    assert f"loralab: MLflow run {run_id} in experiment 'loralab' at {(out / 'mlruns').resolve().as_uri()}" in err


def test_the_summary_says_where_the_wall_time_went(tiny_folder, tmp_path, capsys):
    from loralab.cli import main

    out = tmp_path / "run"
    assert main(["train", str(config_with(tmp_path, tiny_folder, out, train={"max_steps": 2}))]) == 0
    phases = json.loads((out / "summary.json").read_text())["phase_s"]
    assert list(phases) == ["preparation", "loading", "the base evaluation", "training", "the final evaluation"]
    assert all(s >= 0 for s in phases.values())
    assert "  wall time       preparation " in capsys.readouterr().out
