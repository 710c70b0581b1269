"""study/corpus.py and the domain preset: continued pretraining on generated prose, with forgetting."""
from __future__ import annotations

import json

import pytest

from loralab.cli import main
from loralab.errors import UserError
from loralab.study import runner, spec
from loralab.study.corpus import corpus_path


def test_the_corpus_is_prose_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    path = corpus_path({"tasks": ["word_problem_add", "2da"], "n": 5}, "x")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 10 and all(set(r) == {"text"} for r in records)
    assert all(r["text"].endswith(".") and " The answer is " in r["text"] for r in records)
    mtime = path.stat().st_mtime_ns
    assert corpus_path({"tasks": ["word_problem_add", "2da"], "n": 5}, "x") == path and path.stat().st_mtime_ns == mtime
    assert corpus_path({"tasks": ["2da"], "n": 5}, "x") != path
    for bad in ({"tasks": ["nope"]}, {"n": 3}, {"tasks": ["2da"], "n": 0}, ["2da"]):
        with pytest.raises(UserError, match="corpus"):
            corpus_path(bad, "x")


def test_the_domain_preset_runs_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    """The preset for real on the tiny model (its own 60 steps, 2 seeds): every run trains on the
    corpus (data.path), reports forgetting, and the Findings judge the three claims."""
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    study = spec.load_study("domain", seeds=2, overrides=[f"model.name={tiny_folder}", "eval.n=2",
                                                           "train.precision=fp32"])
    assert any(o.startswith("data.path=") and "corpora" in o for o in study.overrides)

    def in_process(cmd, run_dir, log_path):
        return main(["train", cmd[-1]])

    records = runner.run_study(study, tmp_path / "out", runner=in_process, log=lambda m: None)
    assert [r["status"] for r in records] == ["ok"] * 6
    summary = json.loads((tmp_path / "out/cells/cpt/seed-1/summary.json").read_text())
    assert summary["train_examples"] > 800 and "forgetting" in summary  # the corpus, not the suite
    report = runner.build_report(tmp_path / "out")
    findings = report["report_md"].read_text().split("## Findings")[1]
    rows = [line.split(" | ") for line in findings.splitlines() if line.startswith("| F")]
    assert len(rows) == 3 and "(paired, n=2)" in rows[0][2] and "forgetting" not in rows[0][2]
    assert all(r[3] in ("agree", "disagree", "unclear") for r in rows)
    assert report["stats"]["cpt"]["forgetting"].n == 2
