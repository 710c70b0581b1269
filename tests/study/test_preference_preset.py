"""The `preference` study preset: its cells and findings load, and a run's held-out preference accuracy
(summary.json's "preference") is a metric its findings can compare."""
from loralab.study.results import run_metrics
from loralab.study.spec import load_study, run_config


def test_preset_cells_and_their_objectives(tmp_path):
    study = load_study("preference")
    cells = {c.name: c for c in study.cells}
    assert set(cells) == {"sft", "sft-dpo", "orpo"}
    objectives = {n: run_config(study, c, 1, tmp_path / n).train.objective for n, c in cells.items()}
    assert objectives == {"sft": "sft", "sft-dpo": "dpo", "orpo": "orpo"}
    assert cells["sft-dpo"].after == "sft" and cells["orpo"].after is None  # DPO starts from SFT's adapter
    cfg = run_config(study, cells["sft"], 1, tmp_path / "sft")
    assert cfg.eval.preference is True and cfg.data.tasks == ["2da", "2ds"]  # SFT is scored on the pairs too


def test_preference_accuracy_is_a_run_metric():
    summary = {"eval": {}, "preference": {"2da": {"after": {"accuracy": 0.5}}, "2ds": {"after": {"accuracy": 0.75}}}}
    m = run_metrics(summary)
    assert (m["pref_acc_2da"], m["pref_acc_2ds"], m["pref_acc_mean"]) == (50.0, 75.0, 62.5)
    assert "pref_acc_mean" not in run_metrics({"eval": {}})
