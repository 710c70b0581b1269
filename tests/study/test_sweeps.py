"""Studies' learning-rate sweeps (study/sweeps.py): the choice on validation, the other seeds at
the chosen value, a failed sweep, and sweeps a preset may not declare."""
import json
from pathlib import Path

import pytest
import yaml

from loralab.errors import UserError
from loralab.study import runner, spec


def _sweep_study(tmp_path, **extra):
    study_file = tmp_path / "sw.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "sw", "seeds": 3, "sweep_seeds": 1, "sweep": {"train.lr": [1.0e-3, 2.0e-3, 4.0e-3]},
        "axes": [{"name": "a", "set": ["lora.r=4"]},
                 {"name": "b", "set": ["lora.r=8"], "sweep": {"train.lr": [1.0e-4, 3.0e-3]}},
                 {"name": "plain", "set": ["lora.r=2"], "sweep": {}}],
        "findings": [{"claim": "a beats plain", "check": "lower", "a": "a", "b": "plain", "metric": "final_val_loss",
                      "if_unclear": "more seeds: --seeds 6"}], **extra}))
    return spec.load_study(str(study_file))


def sweep_runner(calls):
    """Validation loss is lowest at lr 2e-3 (3e-3 in b's grid); the test loss prefers lr 1e-3: the
    choice must follow validation."""
    def run(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        lr, seed = cfg["train"]["lr"], cfg["train"]["seed"]
        validate_only = cfg["eval"]["tasks"] == []
        calls.append((cfg["output_dir"].split("/cells/")[1].split("/")[0], lr, seed) + (("val",) if validate_only
                                                                                       else ()))
        val = 1.0 + abs(lr - 2e-3) * 100 + seed / 100
        scores = {"2da": {"after": 0.5, "n": 10, "trained": True, "test_loss": 1.0 + abs(lr - 1e-3) * 100}}
        summary = {"final_val_loss": val, "best_val_loss": val - 0.01, "best_step": 8, "steps": 10,
                   "eval": {} if validate_only else scores,
                   "val_history": [{"step": s, "val_loss": val + abs(s - 8) / 10} for s in (2, 4, 6, 8, 10)]}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0
    return run


def test_a_sweep_chooses_on_validation_and_runs_the_other_seeds_there(tmp_path):
    study = _sweep_study(tmp_path)
    assert [len(c.points or []) for c in study.cells] == [3, 2, 0] and spec.count_runs(study) == 5 + 4 + 3
    calls, logs = [], []
    records = runner.run_study(study, tmp_path / "out", runner=sweep_runner(calls), log=logs.append)
    # every point validates only on seed 1; the chosen one is then evaluated (seed 1) and its other seeds run
    assert sorted(calls) == sorted([("a", lr, 1, "val") for lr in (1e-3, 2e-3, 4e-3)]
                          + [("a", 2e-3, s) for s in (1, 2, 3)]
                          + [("b", lr, 1, "val") for lr in (1e-4, 3e-3)] + [("b", 3e-3, s) for s in (1, 2, 3)]
                          + [("plain", 2e-3, s) for s in (1, 2, 3)])  # plain: the base's lr
    assert all(r["status"] == "ok" for r in records) and len(records) == 14
    chosen = json.loads((tmp_path / "out/cells/a/chosen.json").read_text())
    assert chosen["point"] == "lr-0.002" and chosen["overrides"] == ["train.lr=0.002"]
    assert set(chosen["scores"]) == {"lr-0.001", "lr-0.002", "lr-0.004"}
    assert (tmp_path / "out/cells/a/lr-0.002/seed-3/summary.json").is_file()
    assert not (tmp_path / "out/cells/a/lr-0.001/seed-2").exists()  # other seeds only at the chosen point
    assert any("a: sweep chose lr-0.002" in m for m in logs)

    info = json.loads((tmp_path / "out/cells/a/lr-0.002/seed-1/run_info.json").read_text())
    assert "validate_only" not in info and info["status"] == "ok"  # evaluated: it counts as the cell's seed 1
    assert json.loads((tmp_path / "out/cells/a/lr-0.001/seed-1/run_info.json").read_text())["validate_only"]

    result = runner.build_report(tmp_path / "out")
    assert result["stats"]["a"]["final_val_loss"].n == 3  # the cell is its chosen point's three seeds
    assert result["stats"]["a"]["test_loss"].n == 3  # seed 1's sweep run evaluated too
    assert result["sweeps"]["b"]["point"] == "lr-0.003"
    md = (tmp_path / "out/report.md").read_text()
    assert "## Sweeps: each cell at its own best settings" in md and "lr-0.002 (chosen)" in md
    assert "a (sweep chose lr-0.002)" in md and "| a @ lr-0.001 | 1 | ok |" in md
    assert "Cell **a** (seed 1): chose lr-0.002.\n" in md  # in the middle of its grid
    assert "Cell **b** (seed 1): chose lr-0.003. It is at the end of the grid" in md
    assert any("b: sweep chose lr-0.003" in m and m.endswith("at the end of its grid") for m in logs)
    assert md.index("## Verdict rules") < md.index("## Results") < md.index("## Findings")
    assert "## Validation loss along training" in md

    calls.clear()  # resumed: nothing left to run
    records = runner.run_study(_sweep_study(tmp_path), tmp_path / "out", runner=sweep_runner(calls), log=logs.append)
    assert calls == [] and {r["status"] for r in records} == {"skipped"} and len(records) == 14


def test_a_sweep_with_no_finished_point_fails_its_cell_not_the_study(tmp_path):
    def failing_a(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        if "/cells/a/" in cfg["output_dir"]:
            return 1
        return sweep_runner([])(cmd, run_dir, log_path)

    records = runner.run_study(_sweep_study(tmp_path), tmp_path / "out", runner=failing_a, log=lambda m: None)
    failed = [r for r in records if r["cell"] == "a"]
    assert len(failed) == 5 and all(r["status"] == "failed" for r in failed)
    assert any(r.get("error") == "no sweep point finished" for r in failed)
    assert all(r["status"] == "ok" for r in records if r["cell"] != "a")
    md = runner.build_report(tmp_path / "out")["report_md"].read_text()
    assert "chose nothing (no point finished)" in md and "| F1 | a beats plain |" in md and "not measured" in md


@pytest.mark.parametrize("extra, message", [
    ({"select": "test_loss"}, "select must be one of final_val_loss, best_val_loss"),
    ({"sweep_seeds": 0}, "sweep_seeds must be a positive number"),
    ({"sweep": {"train.lr": [1e-3]}}, r"sweep.train.lr must list at least two values"),
    ({"findings": [{"claim": "c", "check": "lower", "a": "a", "b": "plain", "metric": "m"}]},
     r"findings\[0\]: check lower can come out unclear: say what would decide it \(if_unclear\)"),
    ({"findings": [{"claim": "c", "check": "lower", "a": "a", "b": "gone", "metric": "m", "if_unclear": "x"}]},
     r"findings\[0\]: names cell\(s\) gone, not in this study"),
    ({"findings": [{"claim": "c", "check": "similar", "a": "a", "b": "plain", "metric": "m", "if_unclear": "x"}]},
     "check similar needs tol"),
    ({"findings": [{"claim": "c", "check": "lower", "a": "a", "metric": "m", "if_unclear": "x"}]},
     "check lower needs b"),
    ({"findings": [{"claim": "c", "check": "bigger"}]}, "check must be one of"),
])
def test_bad_sweeps_and_findings_are_refused_when_the_study_loads(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        _sweep_study(tmp_path, **extra)


def test_a_cell_may_not_set_what_it_sweeps():
    with pytest.raises(UserError, match="cell a sets train.lr and also sweeps it"):
        spec.expand_cells([{"name": "a", "set": ["train.lr=1e-3"]}], [1], sweep={"train.lr": [1e-3, 2e-3]})
    with pytest.raises(UserError, match="cell c combines adapters; it cannot sweep"):
        spec.expand_cells([{"name": "a", "set": []}, {"name": "b", "set": []},
                           {"name": "c", "combine": {"adapters": ["a", "b"], "method": "cat"},
                            "sweep": {"train.lr": [1e-3, 2e-3]}}], [1])


def test_the_chosen_point_is_evaluated_as_if_in_one_go(tmp_path, tiny_folder):
    """The sweep runs validate only; the chosen point's is then resumed at its last step to evaluate, and
    reports what the same run evaluated in one process reports (the training stats carried over)."""
    from loralab.cli import main

    base = {"model": {"name": str(tiny_folder)}, "lora": {"r": 4},
            "data": {"tasks": ["2da"], "n_train": 16, "template": "raw"},
            "train": {"max_steps": 3, "batch_size": 4, "progress": False, "precision": "fp32", "threads": 1},
            "eval": {"n": 4, "before": False, "forgetting": True, "loss_items": 8}}
    study_file = tmp_path / "sw.yaml"
    study_file.write_text(yaml.safe_dump({"name": "sw", "seeds": 1, "base": base, "axes": [{"name": "a", "set": []}],
                                          "sweep": {"train.lr": [1e-3, 1e-2]}}))
    runner.run_study(spec.load_study(str(study_file)), tmp_path / "out", log=lambda m: None,
                     runner=lambda cmd, folder, log: main(["train", cmd[-1]]))
    point = json.loads((tmp_path / "out/cells/a/chosen.json").read_text())["point"]
    other = ({"lr-0.001", "lr-0.01"} - {point}).pop()
    run = tmp_path / "out/cells/a" / point / "seed-1"
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 3 and resumed["heldout_loss"] is not None and resumed["eval"]["2da"]
    assert json.loads((tmp_path / "out/cells/a" / other / "seed-1/summary.json").read_text())["eval"] == {}
    cfg = yaml.safe_load((run / "cell.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "one-go")
    (tmp_path / "one-go.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "one-go.yaml")]) == 0
    one_go = json.loads((tmp_path / "one-go/summary.json").read_text())
    for key in ("final_val_loss", "final_train_loss", "steps", "train_tokens", "eval", "forgetting", "heldout_loss"):
        assert resumed[key] == one_go[key], key


def test_an_evaluation_stopped_half_way_runs_again_when_the_study_resumes(tmp_path):
    """The chosen point's sweep run is evaluated by resuming it; stopped there (its summary.json is the
    sweep's), the run is failed, still only validated, and the same command evaluates it again."""
    calls, logs, stops = [], [], []
    fine = sweep_runner(calls)

    def stopped_once(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        if cfg["train"]["lr"] == 2e-3 and cfg["train"]["seed"] == 1 and cfg["eval"]["tasks"] != [] and not stops:
            stops.append(1)
            return 130
        return fine(cmd, run_dir, log_path)

    study_file = tmp_path / "one.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "one", "seeds": 2, "sweep_seeds": 1, "axes": [{"name": "a", "sweep": {"train.lr": [1.0e-3, 2.0e-3]}}],
        "findings": [{"claim": "x", "check": "above", "cell": "a", "metric": "final_val_loss", "value": 0,
                      "if_unclear": "more seeds"}]}))
    records = runner.run_study(spec.load_study(str(study_file)), tmp_path / "out", runner=stopped_once,
                               log=logs.append)
    info = json.loads((tmp_path / "out/cells/a/lr-0.002/seed-1/run_info.json").read_text())
    assert stops and info["status"] == "failed" and info["validate_only"]
    assert [r["status"] for r in records if r["seed"] == 1 and r["point"] == "lr-0.002"][-1] == "failed"
    calls.clear()
    runner.run_study(spec.load_study(str(study_file)), tmp_path / "out", runner=stopped_once, log=logs.append)
    assert calls == [("a", 2e-3, 1)]  # only the stopped evaluation, now made
    info = json.loads((tmp_path / "out/cells/a/lr-0.002/seed-1/run_info.json").read_text())
    assert info["status"] == "ok" and "validate_only" not in info
    assert runner.build_report(tmp_path / "out")["stats"]["a"]["test_loss"].n == 2
