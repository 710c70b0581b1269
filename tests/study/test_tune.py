"""study/tune.py: `loralab tune` (successive halving, then the choice against the default, paired)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loralab.cli import main
from loralab.errors import UserError
from loralab.study import runner, tune


def test_space_and_grid():
    space = tune.parse_space("lr=[1.0e-4, 3.0e-4] lora.r=[8, 16] alpha=[16]")
    assert space == {"train.lr": [1e-4, 3e-4], "lora.r": [8, 16], "lora.alpha": [16]}
    points = tune.grid(space)
    assert len(points) == 4 and points[0][1] == ["train.lr=0.0001", "lora.r=8", "lora.alpha=16"]
    for bad in ("lr=3", "lr", "lr=[", ""):
        with pytest.raises(UserError, match="--space"):
            tune.parse_space(bad)


def test_rungs_halve_by_three_up_to_the_final_length():
    assert tune.rungs(9, 150) == [(9, 16), (3, 50)]     # then 1 point: the final comparison at 150
    assert tune.rungs(27, 270) == [(27, 10), (9, 30), (3, 90)]
    assert tune.rungs(2, 60) == [(2, 20)]
    assert tune.rungs(1, 60) == [(1, 60)]
    assert tune.rungs(9, 12)[0] == (9, tune.MIN_STEPS)  # never shorter than MIN_STEPS


def _fake(calls, warmups=None):
    """A `loralab train` stand-in: validation loss |log10(lr) + 3| + 1/r (best: lr 1e-3, the largest r),
    and the held-out loss the same plus a per-seed offset shared by every cell (pairing removes it)."""
    warmups = [] if warmups is None else warmups

    def run(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        lr, r, seed = cfg["train"]["lr"], cfg["lora"]["r"], cfg["train"]["seed"]
        calls.append((run_dir.parent.name, cfg["train"]["max_steps"], seed, cfg["eval"]))
        warmups.append(cfg["train"]["warmup_steps"])
        import math
        loss = abs(math.log10(lr) + 3) + 1 / r
        (run_dir / "summary.json").write_text(json.dumps(
            {"final_val_loss": loss, "heldout_loss": loss + 0.3 * seed, "eval": {}}))
        return 0
    return run


def test_tune_searches_then_compares_paired(tmp_path):
    calls, lines, warmups = [], [], []
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "smollm2-135m"}, "data": {"tasks": ["2da"], "n_train": 50},
                                      "train": {"lr": 1.0e-2, "max_steps": 90, "warmup_steps": 18},
                                      "lora": {"r": 4}}))
    result = tune.tune_command(str(config), space="lr=[1.0e-4, 1.0e-3, 1.0e-2] lora.r=[4, 8, 16]", budget="1h",
                               out=str(tmp_path / "t"), log=lines.append,
                               run_study=lambda st, out, log, parallel: runner.run_study(st, out,
                               runner=_fake(calls, warmups), log=log, parallel=parallel))
    assert result["overrides"] == ["train.lr=0.001", "lora.r=16"]
    steps = [s for _, s, _, _ in calls]
    assert steps[:9] == [10] * 9 and steps[9:12] == [30] * 3 and steps[12:] == [90] * 6  # 9 short, 3 longer, final
    assert warmups == [2] * 9 + [6] * 3 + [18] * 6  # each rung's schedule is the final one's, shrunk
    # the rungs read only the validation loss: no final evaluations; the comparison evaluates in full
    assert all(e["tasks"] == [] and not e["loss_items"] and not e["forgetting"] for *_, e in calls[:12])
    assert all(e["tasks"] != [] for *_, e in calls[12:])
    assert "successive halving over 9 points" in result["rule"]
    md = Path(result["report_md"]).read_text()
    findings = md[md.index("## Findings"):]
    assert "| agree |" in findings and "(paired, n=3)" in findings  # tuned beats default on every seed
    assert "chosen by successive halving" in md
    assert json.loads((tmp_path / "t" / "search.json").read_text())["chosen"] == "lr-0.001_r-16"


def test_a_search_that_keeps_the_config_as_given_compares_nothing(tmp_path):
    calls, lines = [], []
    config = tmp_path / "c.yaml"  # the fake's best point (lr 1e-3, the largest r) is this config itself
    config.write_text(yaml.safe_dump({"model": {"name": "smollm2-135m"}, "data": {"tasks": ["2da"], "n_train": 50},
                                      "train": {"lr": 1.0e-3, "max_steps": 30}, "lora": {"r": 16}}))
    result = tune.tune_command(str(config), space="lr=[1.0e-3, 1.0e-2] lora.r=[4, 16]", out=str(tmp_path / "t"),
                               log=lines.append,
                               run_study=lambda st, out, log, parallel: runner.run_study(st, out, runner=_fake(calls),
                                                                                         log=log))
    assert result["chosen"] == "lr-0.001_r-16" and result["same_as_given"]
    assert len(calls) == 4 + 2 and not (tmp_path / "t" / "final").exists()  # the search only: no equal twins
    assert any("which is the config as given: nothing to compare" in m for m in lines)
    md = result["report_md"].read_text()
    assert "Chose **lr-0.001_r-16**, which is the config as given" in md and "| lr-0.01_r-4 | 1.25 | - |" in md


def test_tune_dry_run_and_bad_input(tmp_path, capsys):
    assert main(["tune", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 points, successive halving" in out and "9 x 16 steps, 3 x 50 steps" in out
    assert main(["tune", "demo", "--dry-run", "--space", "lora.nope=[1]"]) == 2
    assert "lora.nope" in capsys.readouterr().err
    assert main(["tune", "demo", "--dry-run", "train.lr=1e-3"]) == 2  # the space searches it
    assert "which --space searches" in capsys.readouterr().err
    # with --ray too: refused before any cluster is attached (none runs here)
    assert main(["tune", "demo", "--ray", "auto", "--space", "lora.nope=[1]"]) == 2
    assert "lora.nope" in capsys.readouterr().err


def test_tune_runs_a_tiny_model_for_real(tiny_folder, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_folder)}, "data": {"tasks": ["2da"], "n_train": 24, "template": "raw"},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1.0e-3, "precision": "fp32"},
        "eval": {"n": 2, "before": False, "forgetting": False}}))

    def in_process(cmd, run_dir, log_path):
        return main(["train", cmd[-1]])

    result = tune.tune_command(str(config), space="lr=[1.0e-3, 1.0e-2]", out=str(tmp_path / "t"), log=lambda m: None,
                               run_study=lambda st, out, log, parallel: runner.run_study(st, out, runner=in_process,
                                                                                         log=log))
    assert result["chosen"] in ("lr-0.001", "lr-0.01")
    assert {r["status"] for r in result["runs"]} == {"ok"} and len(result["runs"]) == 6
    assert result["stats"]["tuned"]["heldout_loss"].n == 3
