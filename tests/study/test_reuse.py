"""Runs a study takes from the studies beside it (study/reuse.py): whole when the same code made the
same run, resumed to evaluate when only the training is the same, never when the training differs."""
import json
import os
from pathlib import Path

import yaml

from loralab.config import dump_yaml, load_config
from loralab.prepare import resolve_config
from loralab.study import runner, spec
from loralab.train.precision import default_device


def _study(tmp_path, name: str, axes: list, **extra):
    path = tmp_path / f"{name}.yaml"
    base = {"model": {"name": "tiny"}, "train": {"max_steps": 10}, "eval": {"n": 4}}
    path.write_text(yaml.safe_dump({"name": name, "seeds": 2, "base": base, "axes": axes, **extra}))
    return spec.load_study(str(path))


def fake_runner(calls):
    """Writes what a run writes: config.yaml (resolved, as a run records it), a checkpoint, summary.json
    (its numbers from lr and seed)."""
    def run(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        calls.append(cfg["output_dir"].split("/cells/")[1])
        resolved = resolve_config(load_config(cmd[-1]), default_device())
        (run_dir / "config.yaml").write_text(dump_yaml(resolved))
        ckpt = run_dir / "checkpoints/step-00000010"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "state.json").write_text("{}")
        val = cfg["train"]["lr"] * 100 + cfg["train"]["seed"] / 10
        (run_dir / "summary.json").write_text(json.dumps({"final_val_loss": val, "steps": 10, "eval": {}}))
        return 0
    return run


AXES = [{"name": "a", "set": ["lora.r=4"]}, {"name": "b", "set": ["lora.r=8"]}]


def test_a_run_another_study_made_is_taken_whole(tmp_path):
    first = []
    runner.run_study(_study(tmp_path, "one", AXES), tmp_path / "runs/one", runner=fake_runner(first), log=print)
    assert sorted(first) == ["a/seed-1", "a/seed-2", "b/seed-1", "b/seed-2"]
    # "same" trains what one's a trained (threads and tracking differ: they never change a run);
    # "other" differs in the learning rate: trained here
    second, logs = [], []
    two = _study(tmp_path, "two", [{"name": "same", "set": ["lora.r=4", "train.threads=3"]},
                                   {"name": "other", "set": ["lora.r=4", "train.lr=0.01"]}])
    records = runner.run_study(two, tmp_path / "runs/two", runner=fake_runner(second), log=logs.append, reuse=True)
    assert sorted(second) == ["other/seed-1", "other/seed-2"]
    assert all(r["status"] == "ok" for r in records)
    for seed in (1, 2):
        here, there = tmp_path / f"runs/two/cells/same/seed-{seed}", tmp_path / f"runs/one/cells/a/seed-{seed}"
        info = json.loads((here / "run_info.json").read_text())
        assert info["reused_from"] == f"one/cells/a/seed-{seed}" and info["status"] == "ok"
        assert (here / "summary.json").read_text() == (there / "summary.json").read_text()
        assert yaml.safe_load((here / "cell.yaml").read_text())["train"]["threads"] == 3  # its own plan stays
        # checkpoints are linked, not copied: a 7B full fine-tune's would be tens of GB
        assert os.stat(here / "checkpoints/step-00000010/state.json").st_ino == \
            os.stat(there / "checkpoints/step-00000010/state.json").st_ino
    assert any("same seed 1: taken from one/cells/a/seed-1" in m for m in logs)
    md = runner.build_report(tmp_path / "runs/two")["report_md"].read_text()
    assert "2 trained in a study beside this one and copied" in md and "trained in one/cells/a/seed-2" in md
    # a study that must not take them trains everything
    third = []
    runner.run_study(two, tmp_path / "runs/three", runner=fake_runner(third), log=print, reuse=False)
    assert len(third) == 4


def test_other_evaluations_or_other_code_resume_the_copy_to_evaluate(tmp_path, monkeypatch):
    runner.run_study(_study(tmp_path, "one", AXES), tmp_path / "runs/one", runner=fake_runner([]), log=print)
    calls = []
    two = _study(tmp_path, "two", [{"name": "more-eval", "set": ["lora.r=4", "eval.n=9"]}])
    runner.run_study(two, tmp_path / "runs/two", runner=fake_runner(calls), log=print, reuse=True)
    assert calls == ["more-eval/seed-1", "more-eval/seed-2"]  # run here: resumed at the copied checkpoint
    info = json.loads((tmp_path / "runs/two/cells/more-eval/seed-1/run_info.json").read_text())
    trained = json.loads((tmp_path / "runs/one/cells/a/seed-1/run_info.json").read_text())["wall_s"]
    assert info["reused_from"] == "one/cells/a/seed-1" and info["wall_s"] >= trained

    from loralab.study import reuse
    monkeypatch.setattr(reuse, "code_fingerprint", lambda: "changed")
    calls = []
    runner.run_study(_study(tmp_path, "three", AXES[:1]), tmp_path / "runs/three", runner=fake_runner(calls),
                     log=print, reuse=True)
    assert calls == ["a/seed-1", "a/seed-2"]  # other code: its evaluations are redone


def test_the_copy_resumes_and_evaluates_like_a_run_made_here(tmp_path, tiny_folder):
    """On a tiny model: a study taking another's training (different evaluations) resumes the copied
    checkpoint, trains no step, and reports what training and evaluating here in one go reports."""
    from loralab.cli import main

    base = {"model": {"name": str(tiny_folder)}, "lora": {"r": 4},
            "data": {"tasks": ["2da"], "n_train": 16, "template": "raw"},
            "train": {"max_steps": 3, "batch_size": 4, "progress": False, "threads": 1},  # precision: auto
            "eval": {"n": 4, "before": False, "forgetting": False}}

    def study(name, evals):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "seeds": 1, "base": base,
                                        "axes": [{"name": "a", "set": evals}]}))
        return spec.load_study(str(path))

    real = lambda cmd, folder, log: main(["train", cmd[-1]])  # noqa: E731
    runner.run_study(study("one", []), tmp_path / "runs/one", runner=real, log=print)
    runner.run_study(study("two", ["eval.loss_items=8"]), tmp_path / "runs/two", runner=real, log=print, reuse=True)
    runner.run_study(study("fresh", ["eval.loss_items=8"]), tmp_path / "runs/fresh", runner=real, log=print)
    first, taken, fresh = (json.loads((tmp_path / f"runs/{s}/cells/a/seed-1/summary.json").read_text())
                           for s in ("one", "two", "fresh"))
    assert taken["resumed_from_step"] == 3 and fresh.get("resumed_from_step") is None
    assert taken["heldout_loss"] is not None and first.get("heldout_loss") is None
    for key in ("final_val_loss", "final_train_loss", "steps", "train_tokens", "eval", "heldout_loss"):
        assert taken[key] == fresh[key], key


def test_a_run_made_in_another_precision_is_not_taken(tmp_path):
    """precision auto is decided by the machine and recorded so (config.yaml): a run that decided otherwise,
    e.g. on a CPU with fast bf16, is other training, not this run's."""
    from loralab.train.precision import resolve_precision

    runner.run_study(_study(tmp_path, "one", AXES), tmp_path / "runs/one", runner=fake_runner([]), log=print)
    here = resolve_precision("auto", default_device())
    other = "bf16" if here == "fp32" else "fp32"
    for path in (tmp_path / "runs/one").rglob("config.yaml"):
        path.write_text(path.read_text().replace(f"precision: {here}", f"precision: {other}"))
    calls = []
    runner.run_study(_study(tmp_path, "two", AXES), tmp_path / "runs/two", runner=fake_runner(calls), log=print,
                     reuse=True)
    assert len(calls) == 4
