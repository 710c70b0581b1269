"""`loralab study NAME --until-decided`: seeds added, one round at a time, to the cells behind unclear
claims until every claim is decided, the cells reach --max-seeds, or the --budget is spent.

Looking at the results after every round and stopping when a claim is decided is optional stopping:
judged at 95% after each look, a claim with no real effect would be "decided" far more often than 5%
of the time. The rule here is an alpha-spending one with equal spending (Bonferroni over looks): a
claim can be looked at with n = n0, n0 + 1, ..., N seeds (n0: the preset's seeds, at least 2; N:
--max-seeds, lowered to what the budget pays for once the first seeds' wall time is known and before
any claim is judged: fit_looks), K = N - n0 + 1 looks in all, and every look's interval is a t
interval at level alpha / K (`look_alpha`). Each interval is exact under normal per-seed differences; by the union
bound the chance that any look of a claim with no effect excludes zero is at most alpha (5%),
whatever the stopping rule. It is conservative (the looks overlap), which tests/study/test_sequential.py
measures by simulation, along with the power at the effect sizes the presets expect.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..io.fileio import write_json
from .results import load_json
from .spec import Study, sources, study_plan
from .verdicts import judge

ALPHA = 0.05
DEFAULT_MAX_SEEDS = 8
DEFAULT_BUDGET = "45m"
STATE_FILE = "until_decided.json"  # in the study folder: the looks as fitted and the time spent, for a resume


def parse_duration(text: str, where: str = "--budget") -> float:
    """'45m', '1h30m', '90s', '2h' -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(text))
    if not parts or not any(parts.groups()):
        raise UserError(f"{where} must be a duration such as 45m, 1h30m or 90s, got {text!r}")
    h, m, s = (float(g or 0) for g in parts.groups())
    total = 3600 * h + 60 * m + s
    if total <= 0:
        raise UserError(f"{where} must be positive, got {text!r}")
    return total


def first_look(study: Study) -> int:
    """n0: the fewest seeds a cell a round may grow starts with (at least 2: one seed gives no interval)."""
    grow = growable(study)
    sizes = [len(c.seeds) for c in study.cells if not c.combine and (c.name in grow or not grow)]
    return max(2, min(sizes, default=2))


def look_alpha(n0: int, max_seeds: int, alpha: float = ALPHA) -> float:
    """The level of each look's interval: alpha spent equally over the K = max_seeds - n0 + 1 looks."""
    return alpha / max(1, max_seeds - n0 + 1)


def sequential_plan(study: Study, max_seeds: int) -> dict:
    """What study.json keeps so that a report (and a rerun of it) judges at the per-look level."""
    if max_seeds < 2:
        raise UserError(f"--max-seeds must be at least 2, got {max_seeds}")
    n0 = first_look(study)
    if max_seeds < n0:
        raise UserError(f"--max-seeds {max_seeds} is below the {n0} seeds the study starts with")
    return {"alpha": ALPHA, "max_seeds": max_seeds, "first_look": n0, "looks": max_seeds - n0 + 1,
            "look_alpha": look_alpha(n0, max_seeds)}


def describe_plan(seq: dict, budget_s: float, preset_time: str, here: dict | None = None) -> str:
    """What --until-decided will do and how long it may take: said before anything starts. here: this
    machine's plan ({first_s, round_s}: the study's own seeds and one round, estimated), if made."""
    first = f"{preset_time} on the CPU the preset was timed on"
    warn = ""
    if here:
        first = f"about {here['first_s'] / 60:.0f} min here, estimated; {first}"
        rounds = int(max(0.0, budget_s - here["first_s"]) // here["round_s"]) if here["round_s"] > 0 else 0
        if rounds == 0:
            warn = (f" On this machine the budget is unlikely to pay for a round: about "
                    f"{(here['first_s'] + here['round_s']) / 60:.0f} min would pay for one.")
    return (f"--until-decided: the study's own seeds first ({first}), then "
            f"one more seed a round for the cells behind unclear claims, up to {seq['max_seeds']} seeds a cell, until "
            f"every claim is decided; at most {budget_s / 60:.0f} min in all. 5% is spent equally over the looks "
            f"the budget pays for (at most {seq['looks']}: n = {seq['first_look']}..{seq['max_seeds']}, every "
            f"interval then at {100 * (1 - seq['look_alpha']):.2f}%), fixed from the first seeds' wall time before "
            f"any claim is judged, so a claim with no effect is decided at most 5% of the time however the rounds "
            f"stop.{warn}")


def single_runs(study: Study, spec: dict) -> bool:
    """A claim between cells the study runs at one seed while its other cells run several (memory and
    parameter counts): judged on single values, it has no interval for a seed to narrow."""
    by_name = {c.name: c for c in study.cells}
    return (all(len(by_name[n].seeds) == 1 for n in findings_cells(spec))
            and any(len(c.seeds) > 1 for c in study.cells))


def growable(study: Study) -> set:
    """The cells a round may add a seed to: those a claim with an interval names, and the cells their
    adapters come from."""
    return {n for f in study.findings if not single_runs(study, f) for name in findings_cells(f)
            for n in [name] + sources(next(c for c in study.cells if c.name == name))}


def round_seconds(study: Study, walls: dict, parallel: int = 1) -> tuple[float, float]:
    """(seconds a run, seconds a round) when a round grows every growable cell, each run at the mean of
    those cells' `walls` ({cell: [seconds]}; any cell's when none of theirs are known)."""
    grow = growable(study)
    own = [w for cell in grow for w in walls.get(cell, [])] or [w for ws in walls.values() for w in ws]
    per_run = sum(own) / len(own) if own else 0.0
    return per_run, per_run * -(-len(grow) // max(1, parallel))


def fit_looks(study: Study, seq: dict, walls: dict, left_s: float, parallel: int = 1) -> dict:
    """The looks the budget can pay for, fixed after the study's own seeds and before any claim is judged:
    a round may grow every cell a claim with an interval names (its worst case), each at its own first
    runs' mean wall time (walls: {cell: [seconds]}). Fewer looks spend alpha over fewer intervals, so each
    is narrower. The only data read are wall times (a claim about run time depends on them weakly;
    docs/studies.md says so)."""
    per_run, round_s = round_seconds(study, walls, parallel)
    n0, most = seq["first_look"], seq["max_seeds"]
    rounds = most - n0 if round_s <= 0 else max(0, int(left_s // round_s))
    n_max = min(most, n0 + rounds)
    return {**seq, "max_seeds": n_max, "looks": n_max - n0 + 1, "look_alpha": look_alpha(n0, n_max),
            "fitted": {"per_run_s": round(per_run, 1), "round_s": round(round_s, 1), "left_s": round(left_s, 1),
                       "max_seeds_asked": most}}


def cell_walls(records: list[dict]) -> dict:
    """{cell: [wall seconds of its runs]} from run records (those that have one)."""
    out: dict = {}
    for r in records:
        if r.get("wall_s"):
            out.setdefault(r["cell"], []).append(r["wall_s"])
    return out


def findings_cells(spec: dict) -> list[str]:
    return [spec[k] for k in ("a", "b", "cell") if k in spec] + list(spec.get("cells") or [])


def cells_to_grow(study: Study, findings: list, stats: dict, alpha: float, max_seeds: int) -> list:
    """The cells behind claims unclear at this look that can still take a seed (a combine or staged
    cell brings the cells whose adapters of the same seed it needs)."""
    by_name = {c.name: c for c in study.cells}
    names: list[str] = []
    for spec in findings:
        if single_runs(study, spec) or judge(spec, stats, alpha)[1] != "unclear":
            continue
        for name in findings_cells(spec):
            cell = by_name[name]
            for n in [name] + sources(cell):
                if n not in names and len(by_name[n].seeds) < max_seeds:
                    names.append(n)
    return [by_name[n] for n in names]


def until_decided(study: Study, out_dir: Path, *, budget_s: float, max_seeds: int, run_round: Callable,
                  collect_stats: Callable, log: Callable[[str], None], clock=time.monotonic,
                  parallel: int = 1, walls: Callable[[dict], dict] | None = None) -> list[dict]:
    """Run the study's seeds, then rounds of one more seed for the cells behind unclear claims.

    run_round(study) runs whatever (cell, seed) is not done yet and returns its records (runner.run_study);
    collect_stats(plan) reads the study folder back into {cell: {metric: Stat}} (results.collect).
    Run again on the same folder it resumes: the budget counts the earlier processes' time, and the looks
    stay as the first process fitted them (STATE_FILE); the rounds replay, their finished runs skipped."""
    state_path = Path(out_dir) / STATE_FILE
    state = load_json(state_path, {}) or {}
    start, spent_before = clock(), float(state.get("spent_s") or 0)

    def spent() -> float:  # a resumed study counts the time its earlier processes spent
        return spent_before + clock() - start

    try:
        return _rounds(study, out_dir, state, spent, budget_s=budget_s, max_seeds=max_seeds, run_round=run_round,
                       collect_stats=collect_stats, log=log, parallel=parallel, walls=walls)
    finally:  # also when stopped: the next process starts from what this one spent
        if state_path.parent.is_dir():
            write_json(state_path, {**load_json(state_path, {}), "spent_s": round(spent(), 1)})


def _rounds(study: Study, out_dir: Path, state: dict, spent: Callable[[], float], *, budget_s: float,
            max_seeds: int, run_round: Callable, collect_stats: Callable, log: Callable[[str], None],
            parallel: int, walls: Callable[[dict], dict] | None) -> list[dict]:
    records = list(run_round(study))
    if state.get("plan"):  # fitted by an earlier process, whose looks may have judged claims: kept as they were
        seq = state["plan"]
    else:
        first = walls(study_plan(study)) if walls else cell_walls(records)
        seq = fit_looks(study, sequential_plan(study, max_seeds), first, budget_s - spent(), parallel)
        write_json(Path(out_dir) / STATE_FILE, {"plan": seq, "spent_s": round(spent(), 1)})
    study.sequential = seq
    write_json(out_dir / "study.json", study_plan(study))  # the report judges at this level
    max_seeds = seq["max_seeds"]
    log(f"[{study.name}] the first seeds took ~{seq['fitted']['per_run_s']:.0f} s a run: the budget pays for "
        f"{seq['looks'] - 1} more round(s), so {seq['looks']} look(s) (n = {seq['first_look']}..{max_seeds}), "
        f"every interval at {100 * (1 - seq['look_alpha']):.2f}%")
    rounds = 0
    while True:
        stats = collect_stats(study_plan(study))
        grow = cells_to_grow(study, study.findings, stats, seq["look_alpha"], max_seeds)
        unclear = sum(judge(f, stats, seq["look_alpha"])[1] == "unclear" for f in study.findings)
        if not unclear:
            log(f"[{study.name}] every claim is decided after {rounds} extra round(s)")
            break
        if not grow:
            cap = "--max-seeds" if max_seeds == seq["fitted"]["max_seeds_asked"] else "the most the budget pays for:"
            log(f"[{study.name}] {unclear} claim(s) still unclear at {cap} {max_seeds}")
            break
        done = [r["wall_s"] for r in records if r.get("status") == "ok" and r.get("wall_s")]
        per_run = sum(done) / len(done) if done else seq["fitted"]["per_run_s"]
        elapsed = spent()
        if elapsed + per_run * -(-len(grow) // max(1, parallel)) > budget_s:
            log(f"[{study.name}] {unclear} claim(s) still unclear; the next round ({len(grow)} runs of "
                f"~{per_run:.0f} s) would pass the budget ({elapsed / 60:.1f} of {budget_s / 60:.0f} min spent)")
            break
        for cell in grow:
            cell.seeds.append(max(cell.seeds) + 1)
        rounds += 1
        log(f"[{study.name}] round {rounds}: {unclear} claim(s) unclear; one more seed for "
            + ", ".join(f"{c.name} (seed {c.seeds[-1]})" for c in grow))
        records += [r for r in run_round(study) if r.get("status") != "skipped"]
    return records
