"""study/sequential.py: --until-decided. The stopping rule is checked by simulation (false decisions
under no effect stay at or below 5%; a real effect is decided), the rounds with a fake runner."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from loralab.errors import UserError
from loralab.study import runner, sequential
from loralab.study.stats import t_quantile

SIMS = 2000


def _decided(diffs: np.ndarray, n0: int, max_seeds: int) -> np.ndarray:
    """Per simulated claim: did any look n = n0..max_seeds have a per-look interval excluding 0?
    (What until_decided does with a lower/higher claim: stop at the first decided look.)"""
    alpha = sequential.look_alpha(n0, max_seeds)
    decided = np.zeros(len(diffs), dtype=bool)
    for n in range(n0, max_seeds + 1):
        x = diffs[:, :n]
        hw = t_quantile(1 - alpha / 2, n - 1) * x.std(axis=1, ddof=1) / np.sqrt(n)
        decided |= np.abs(x.mean(axis=1)) > hw
    return decided


@pytest.mark.parametrize("n0", [2, 3])
def test_no_effect_is_decided_at_most_five_percent_of_the_time(n0):
    """2,000 claims with no effect, looked at after every seed up to the default max: the rate at
    which any look decides (a false agree or disagree) stays at or below 5% (+ 3 standard errors)."""
    rng = np.random.default_rng(45 + n0)
    max_seeds = sequential.DEFAULT_MAX_SEEDS
    rate = _decided(rng.normal(0.0, 1.0, (SIMS, max_seeds)), n0, max_seeds).mean()
    assert rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / SIMS)
    # the same looks at a fixed 95% each would not hold it: optional stopping is what the rule guards against
    naive = np.zeros(SIMS, dtype=bool)
    x = rng.normal(0.0, 1.0, (SIMS, max_seeds))
    for n in range(n0, max_seeds + 1):
        naive |= np.abs(x[:, :n].mean(1)) > t_quantile(0.975, n - 1) * x[:, :n].std(1, ddof=1) / np.sqrt(n)
    assert naive.mean() > 0.1


def test_a_real_effect_is_decided():
    """Paired differences with mean 2 standard deviations (the size of the effects the presets decide
    on a CPU: e.g. a rank's or a learning rate's validation loss, where seed-to-seed spread of the
    per-seed difference is about half the effect) are decided by 8 seeds nearly always."""
    rng = np.random.default_rng(7)
    rate = _decided(rng.normal(2.0, 1.0, (SIMS, 8)), 3, 8).mean()
    assert rate >= 0.85
    assert _decided(rng.normal(1.0, 1.0, (SIMS, 8)), 3, 8).mean() < rate  # a smaller one, less often


def test_budgets_parse_and_bad_ones_are_one_line():
    assert sequential.parse_duration("45m") == 2700 and sequential.parse_duration("1h30m") == 5400
    assert sequential.parse_duration("90s") == 90
    for bad in ("", "45", "-3m", "0m", "soon"):
        with pytest.raises(UserError, match="--budget"):
            sequential.parse_duration(bad)


def _runner(effect: dict, calls: list):
    """A fake `loralab train`: each cell's val loss is its effect plus a per-seed noise shared by
    every cell (what pairing removes) plus a tiny own noise."""
    def run(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        cell, seed = run_dir.parent.name, cfg["train"]["seed"]
        calls.append((cell, seed))
        rng = np.random.default_rng(seed)
        shared, own = rng.normal(0, 0.5), np.random.default_rng(1000 * seed + ord(cell[0])).normal(0, 0.01)
        loss = 1.0 + effect.get(cell, 0.0) + shared + own
        (run_dir / "summary.json").write_text(json.dumps({"final_val_loss": loss, "heldout_loss": loss, "eval": {
            "t": {"after": 0.5, "trained": True, "test_loss": loss}}, "peak_memory_bytes": 2**20}))
        return 0
    return run


def _study_file(tmp_path, seeds=2):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "seq", "seeds": seeds, "time": "~1 min",
        "axes": [{"name": "a", "set": ["lora.r=4"]}, {"name": "b", "set": ["lora.r=8"]},
                 {"name": "c", "set": ["lora.r=16"]}],
        "findings": [{"claim": "b beats a", "check": "lower", "a": "b", "b": "a", "metric": "heldout_loss",
                      "if_unclear": "more seeds"},
                     {"claim": "c is like a", "check": "lower", "a": "c", "b": "a", "metric": "heldout_loss",
                      "if_unclear": "more seeds"}]}))
    return str(path)


def test_until_decided_adds_seeds_only_behind_unclear_claims(tmp_path):
    """b is clearly better than a (paired: the shared noise cancels); c equals a, so that claim stays
    unclear and only a and c get seeds, one round at a time, up to --max-seeds."""
    calls, lines = [], []
    result = runner.study_command(_study_file(tmp_path), out=str(tmp_path / "out"), until_decided=True, max_seeds=5,
                                  budget="1h", runner=_runner({"b": -0.2}, calls), log=lines.append)
    seeds = {c: sorted(s for cc, s in calls if cc == c) for c in "abc"}
    # round 1: both claims unclear at n=2 (the per-look interval is wide); b's is decided at n=3
    assert seeds == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3], "c": [1, 2, 3, 4, 5]}
    assert any("--until-decided" in line and "at most 60 min" in line for line in lines)  # said before it starts
    assert any("still unclear at --max-seeds 5" in line for line in lines)
    md = Path(result["report_md"]).read_text()
    assert "Run with --until-decided" in md and "98.75% interval" in md  # 5% over looks n = 2..5
    assert "difference [98.75% interval])" in md
    plan = json.loads((tmp_path / "out" / "study.json").read_text())
    assert plan["sequential"]["looks"] == 4 and len(plan["cells"][0]["seeds"]) == 5
    findings = md[md.index("## Findings"):]
    assert "(paired, n=" in findings and "detectable effect" in findings


def test_until_decided_stops_at_the_budget(tmp_path):
    calls, lines = [], []
    clock = iter(range(0, 10_000, 100))  # every look of the clock: 100 s later
    study = runner.load_study(_study_file(tmp_path))
    study.sequential = sequential.sequential_plan(study, 8)

    def run_round(st):
        return runner.run_study(st, tmp_path / "o", runner=_runner({}, calls), log=lambda m: None)

    sequential.until_decided(study, tmp_path / "o", budget_s=150, max_seeds=8, run_round=run_round,
                             collect_stats=lambda plan: runner.collect(tmp_path / "o", plan).stats,
                             log=lines.append, clock=lambda: next(clock))
    assert any("would pass the budget" in line for line in lines) and len(calls) <= 6 + 3


def test_a_resumed_study_counts_the_time_already_spent_and_keeps_its_looks(tmp_path):
    """Stopped during its first round, then run again: the budget holds the first process's time, and
    the looks are those fitted after the first seeds (claims were judged at that level)."""
    calls, now, out = [], [0.0], tmp_path / "o"

    def until_decided(stop_at_round: int | None, lines: list):
        study = runner.load_study(_study_file(tmp_path))
        study.sequential = sequential.sequential_plan(study, 8)
        rounds = []

        def run_round(st):
            rounds.append(1)
            if len(rounds) == stop_at_round:
                now[0] += 1000
                raise KeyboardInterrupt
            before = len(calls)
            records = runner.run_study(st, out, runner=_runner({}, calls), log=lambda m: None)
            now[0] += 1000 if len(calls) > before else 0  # a round that trains takes 1,000 s
            return records

        try:
            sequential.until_decided(study, out, budget_s=2500, max_seeds=8, run_round=run_round, log=lines.append,
                                     collect_stats=lambda plan: runner.collect(out, plan).stats,
                                     clock=lambda: now[0], walls=lambda plan: {c: [100.0] * 2 for c in "abc"})
        except KeyboardInterrupt:
            pass

    first, second = [], []
    until_decided(2, first)  # first seeds (1,000 s: 1,500 left, rounds of 300 s: 5 rounds, 6 looks), then stopped
    state = json.loads((out / sequential.STATE_FILE).read_text())
    assert state["spent_s"] == 2000 and state["plan"]["looks"] == 6 and len(calls) == 6
    now[0] = 0.0  # a new process's clock
    until_decided(None, second)
    # 2,000 s spent: one round of 300 s fits (3 runs), then the next would pass 2,500 s; fitted afresh with
    # 500 s left it would have been 2 looks, and counted from zero it would run 3 rounds
    assert len(calls) == 6 + 3 and any("so 6 look(s)" in line for line in second)
    assert any("would pass the budget (50.0 of 42 min spent)" in line for line in second)
    assert json.loads((out / sequential.STATE_FILE).read_text())["spent_s"] == 3000


def test_dry_run_says_the_plan_and_bad_flags_are_one_line(tmp_path, capsys):
    from loralab.cli import main

    assert main(["study", "qlora", "--dry-run", "--until-decided", "--max-seeds", "6", "--budget", "30m"]) == 0
    out = capsys.readouterr().out
    assert "--until-decided" in out and "up to 6 seeds a cell" in out and "at most 30 min" in out
    assert main(["study", "qlora", "--dry-run", "--max-seeds", "6"]) == 2
    assert "belong to --until-decided" in capsys.readouterr().err
    assert main(["study", "qlora", "--dry-run", "--until-decided", "--max-seeds", "2"]) == 2
    assert "below the 3 seeds" in capsys.readouterr().err


def test_the_looks_are_what_the_budget_pays_for(tmp_path):
    """Fixed from the first seeds' wall time before any claim is judged: fewer looks, narrower intervals."""
    study = runner.load_study(_study_file(tmp_path, seeds=3))
    seq = sequential.sequential_plan(study, 8)
    assert seq["looks"] == 6
    # 3 cells behind claims, 2 at a time: a round is 2 runs long; 45 min left at 10 min a run: 2 rounds
    walls = {c: [600.0] * 3 for c in "abc"}
    fitted = sequential.fit_looks(study, seq, walls, left_s=2700, parallel=2)
    assert (fitted["max_seeds"], fitted["looks"]) == (5, 3) and fitted["look_alpha"] == pytest.approx(0.05 / 3)
    none = sequential.fit_looks(study, seq, walls, left_s=1000, parallel=2)
    assert (none["max_seeds"], none["looks"], none["look_alpha"]) == (3, 1, 0.05)  # plain 95% intervals
    assert sequential.fit_looks(study, seq, {}, left_s=10, parallel=1)["looks"] == 6  # no wall time known: all


def test_a_round_costs_the_cells_it_can_grow_at_their_own_wall_time(tmp_path):
    """Cells a study runs at one seed beside cells of several (memory runs) are judged on single values:
    no round grows them, so neither their count nor their short runs enter a round's cost."""
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "name": "m", "seeds": 3, "time": "~1 min",
        "axes": [{"name": "a", "set": ["lora.r=4"]}, {"name": "b", "set": ["lora.r=8"]},
                 {"name": "mem-a", "seeds": 1, "set": ["lora.r=4"]},
                 {"name": "mem-b", "seeds": 1, "set": ["lora.r=8"]}],
        "findings": [{"claim": "b beats a", "check": "lower", "a": "b", "b": "a", "metric": "heldout_loss",
                      "if_unclear": "more seeds"},
                     {"claim": "mem-b is lower", "check": "lower", "a": "mem-b", "b": "mem-a",
                      "metric": "peak_memory_mb", "if_unclear": "more seeds"}]}))
    study = runner.load_study(str(path))
    assert sequential.growable(study) == {"a", "b"}
    walls = {"a": [600.0] * 3, "b": [600.0] * 3, "mem-a": [30.0], "mem-b": [30.0]}
    fitted = sequential.fit_looks(study, sequential.sequential_plan(study, 8), walls, left_s=1300, parallel=2)
    # looks start at a and b's 3 seeds; a round is a and b side by side, 600 s: two rounds fit (counting all
    # four cells at their mean wall it was one, from n = 2)
    assert sequential.first_look(study) == 3 and fitted["fitted"]["round_s"] == 600.0
    assert (fitted["max_seeds"], fitted["looks"]) == (5, 3)


def test_a_budget_that_pays_for_no_round_judges_at_95(tmp_path):
    calls, lines = [], []
    study = runner.load_study(_study_file(tmp_path))
    study.sequential = sequential.sequential_plan(study, 8)
    out = tmp_path / "o"
    sequential.until_decided(study, out, budget_s=600, max_seeds=8, log=lines.append,
                             run_round=lambda st: runner.run_study(st, out, runner=_runner({}, calls), log=print),
                             collect_stats=lambda plan: runner.collect(out, plan).stats,
                             walls=lambda plan: {c: [400.0] * 2 for c in "abc"})
    assert len(calls) == 6 and any("budget pays for 0 more round(s), so 1 look(s)" in line for line in lines)
    assert json.loads((out / "study.json").read_text())["sequential"]["look_alpha"] == 0.05
