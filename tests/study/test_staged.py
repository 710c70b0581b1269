"""Staged cells (`after: CELL`): each seed trains on the base with the earlier cell's adapter of the
same seed merged in (model.adapter), after that cell; the checks a bad `after` meets."""
import json
from pathlib import Path

import pytest
import yaml

from loralab.errors import UserError
from loralab.study import runner, sequential, spec
from loralab.study.stats import Stat

from .test_study import fake_runner


@pytest.mark.parametrize("item, needle", [
    ({"name": "c", "after": "nope"}, "starts from 'nope', which is not a training cell"),
    ({"name": "c", "after": "a", "sweep": {"train.lr": [1e-3, 2e-3]}}, "cannot sweep"),
    ({"name": "c", "after": ["a"]}, "must name one training cell"),
    ({"name": "c", "after": "a", "combine": {"adapters": ["a"]}}, "must name one training cell"),
    ({"name": "c", "after": "a", "seeds": [1, 2]}, "runs seeds that cell a does not train")])
def test_bad_staged_cells_are_one_line_errors(item, needle):
    with pytest.raises(UserError, match=needle):
        spec.expand_cells([{"name": "a", "set": [], "seeds": [1]}, item], [1])


def test_a_staged_cell_cannot_start_from_another_staged_cell():
    with pytest.raises(UserError, match="starts from 'b', which is not a training cell"):
        spec.expand_cells([{"name": "a"}, {"name": "b", "after": "a"}, {"name": "c", "after": "b"}], [1])


def test_a_study_sweep_leaves_a_staged_cell_at_its_own_values():
    cells = {c.name: c for c in spec.expand_cells([{"name": "a"}, {"name": "b", "after": "a"}], [1],
                                                  sweep={"train.lr": [1e-3, 2e-3]})}
    assert cells["a"].points and cells["b"].points is None


def test_staged_cells_run_after_their_source_with_its_adapter_as_model_adapter(tmp_path):
    calls = []
    study = spec.load_study("preference", seeds=2)
    fake = fake_runner(calls)

    def run(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        if run_dir.parent.name == "sft-dpo":
            first = Path(cfg["model"]["adapter"])
            assert first == tmp_path / f"cells/sft/seed-{cfg['train']['seed']}/adapter"
            assert (first.parent / "summary.json").exists()  # its source finished first
        else:
            assert cfg["model"]["adapter"] is None
        return fake(cmd, run_dir, log_path)

    runner.run_study(study, tmp_path, parallel=2, runner=run, log=lambda m: None)
    order = [c for c, _ in calls]
    assert order.count("sft-dpo") == 2 and min(i for i, c in enumerate(order) if c == "sft-dpo") == 4


def test_growing_a_staged_cell_brings_its_source():
    study = spec.load_study("preference", seeds=2)
    finding = next(f for f in study.findings if f["a"] == "sft-dpo")
    noisy = {"sft-dpo": {"pref_acc_mean": Stat([60.0, 80.0], [1, 2])},
             "sft": {"pref_acc_mean": Stat([70.0, 65.0], [1, 2])}}
    grow = sequential.cells_to_grow(study, [finding], noisy, 0.05, max_seeds=8)
    assert [c.name for c in grow] == ["sft-dpo", "sft"]


def test_the_plan_and_dry_run_name_the_stage(tmp_path):
    study = spec.load_study("preference")
    assert "after sft (its adapter of the same seed merged in)" in spec.describe(study)
    assert json.loads(json.dumps(spec.study_plan(study)))["cells"][1]["after"] == "sft"
