"""Rerunning a finished run says so and does nothing (loralab/rerun.py); summary.json records
whether a run resumed, and from which step."""
import json
import shutil

from cli_cases import base_config
from loralab.cli import main
from loralab.config import load_config
from loralab.pipeline import run_training


def test_a_rerun_of_a_finished_run_says_so_and_touches_nothing(untouched, capsys):
    """`untouched` asserts every file of the finished run is byte-identical afterwards."""
    cfg = untouched.parent / "prev.yaml"  # the config the finished run was trained from
    assert main(["train", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert f"loralab: {untouched} already finished this run (2 steps; its summary.json)" in captured.err
    assert "resuming from" not in captured.err and "evaluating" not in captured.err
    assert f"loralab run -> {untouched}" in captured.out  # its table, from the summary it has
    assert json.loads((untouched / "summary.json").read_text())["resumed_from_step"] is None  # a fresh start


def test_a_changed_config_or_resume_false_trains_again(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(base_config(tiny_folder, out)))
    run_training(load_config(path), quiet=True)
    capsys.readouterr()
    assert main(["train", str(path), "resume=false"]) == 0
    assert "already finished" not in capsys.readouterr().err
    assert main(["train", str(path), "train.max_steps=3"]) == 2  # more steps: not this run (the scheduler differs)
    assert "already finished" not in capsys.readouterr().err


def test_the_summary_records_the_step_a_run_resumed_from(tiny_folder, tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(base_config(tiny_folder, out)))
    run_training(load_config(path), quiet=True)
    # as if killed after step 1's checkpoint: the later checkpoint and the summary never written
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    (out / "summary.json").unlink()
    summary = run_training(load_config(path), quiet=True)
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 1


def test_a_resumed_run_measures_missing_base_scores_on_its_base(tiny_folder, tmp_path):
    """eval.* keys may change on a resume: a run resumed with eval.before / eval.forgetting turned on,
    whose first segment had them off, scores the base (its LoRA layers off), not the trained model."""
    first = base_config(tiny_folder, tmp_path / "run", eval={"forgetting": False})
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(first))
    run_training(load_config(path), quiet=True)
    scored = {"before": True, "forgetting": True, "tasks": ["2da"]}
    path.write_text(json.dumps(base_config(tiny_folder, tmp_path / "run", eval=scored)))
    resumed = run_training(load_config(path), quiet=True)  # from the last step: no training, the evaluations
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 2
    path.write_text(json.dumps(base_config(tiny_folder, tmp_path / "fresh", eval=scored)))
    fresh = run_training(load_config(path), quiet=True)
    assert resumed["forgetting"] == fresh["forgetting"]  # before (the base) and after, task by task
    assert any(r["change"] != 0 for r in resumed["forgetting"]["tasks"].values())  # lr 1e-2 moved the other tasks
    assert resumed["eval"] == fresh["eval"]
    assert resumed["final_val_loss"] == fresh["final_val_loss"]


def test_a_resumed_full_fine_tune_has_no_base_to_score(tiny_folder, tmp_path):
    path = tmp_path / "c.yaml"
    full = {"method": "full", "lr": 1e-3}
    path.write_text(json.dumps(base_config(tiny_folder, tmp_path / "run", train=full, eval={"forgetting": False})))
    run_training(load_config(path), quiet=True)
    scored = {"before": True, "forgetting": True, "tasks": ["2da"]}
    path.write_text(json.dumps(base_config(tiny_folder, tmp_path / "run", train=full, eval=scored)))
    resumed = run_training(load_config(path), quiet=True)  # its weights have trained: no "before" to measure
    assert resumed.get("forgetting") is None and resumed["eval"]["2da"]["before"] is None


def test_a_run_resumed_to_evaluate_reports_the_training_segments_memory(tiny_folder, tmp_path, monkeypatch):
    """The summary's loop peak and CPU seconds cover every segment (each checkpoint keeps them so far): a
    run resumed at its last step trains nothing, and must not report its own near-idle loop as the run's."""
    from loralab.memory.measure import PeakMemory

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(base_config(tiny_folder, tmp_path / "run")))
    with monkeypatch.context() as m:  # the first segment's peak, made unmistakable
        m.setattr(PeakMemory, "so_far", lambda self: 10**12)
        m.setattr(PeakMemory, "result", lambda self: {"peak_memory_bytes": 10**12, "memory_method": "test",
                                                      "memory_at_start_bytes": 0})
        first = run_training(load_config(path), quiet=True)
    assert first["peak_memory_bytes"] == 10**12
    path.write_text(json.dumps(base_config(tiny_folder, tmp_path / "run", eval={"tasks": ["2da"]})))
    resumed = run_training(load_config(path), quiet=True)  # eval.* changed: resumed at step 2, evaluated
    assert resumed["resumed_from_step"] == 2
    assert resumed["peak_memory_bytes"] == 10**12 and resumed["peak_memory_bytes_per_rank"] == [10**12]
    assert resumed["train_cpu_s"] >= first["train_cpu_s"] > 0


def test_a_summary_left_by_another_config_is_not_this_runs(tiny_folder, tmp_path, capsys):
    """An attempt with another config (evaluations added, as a study's chosen sweep point resumes for)
    rewrites config.yaml when it begins; stopped there, it leaves the first config's summary.json. The
    next attempt must evaluate, not call the run finished."""
    out = tmp_path / "run"
    first = tmp_path / "a.yaml"
    first.write_text(json.dumps(base_config(tiny_folder, out)))
    run_training(load_config(first), quiet=True)
    evaluated = tmp_path / "b.yaml"
    evaluated.write_text(json.dumps(base_config(tiny_folder, out, eval={"tasks": ["2da"]})))
    from loralab.config import dump_yaml
    from loralab.prepare import resolve_config
    from loralab.train.precision import default_device

    (out / "config.yaml").write_text(dump_yaml(resolve_config(load_config(evaluated), default_device())))
    capsys.readouterr()
    assert main(["train", str(evaluated)]) == 0
    err = capsys.readouterr().err
    assert "already finished" not in err and "resuming from" in err
    assert "2da" in json.loads((out / "summary.json").read_text())["eval"]  # evaluated this time
    assert main(["train", str(evaluated)]) == 0  # and now it is finished
    assert "already finished this run" in capsys.readouterr().err
