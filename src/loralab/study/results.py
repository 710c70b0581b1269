"""Reading a study folder back: each run's summary.json (and run_info.json) as numbers, gathered
per cell into `stats.Stat`s for report.py; a swept cell's choice (the runner asks the same
function before it runs the chosen point's other seeds). Pure reading: nothing here launches or writes."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .stats import Stat
from .sweeps import run_dir

# Metrics read from each run's summary.json (accuracy is added per task as acc_<task>, in percent).
SUMMARY_METRICS = ("final_train_loss", "final_val_loss", "best_val_loss", "runtime_s", "tokens_per_s",
                   "trainable_params", "steps", "epochs", "heldout_loss")

def load_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run_metrics(summary: dict, info: dict | None = None) -> dict[str, float]:
    """One run's numbers, flattened: summary fields, peak memory in MB, accuracy per task in %,
    and the held-out aggregates: over tasks the run trained on (their test items; _seen_tasks) and
    over tasks it never saw (_unseen_tasks: the suite's held-out families)."""
    m = {k: float(summary[k]) for k in SUMMARY_METRICS
         if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)}
    if isinstance(summary.get("peak_memory_bytes"), (int, float)):
        m["peak_memory_mb"] = summary["peak_memory_bytes"] / 2**20
    results = {t: r for t, r in (summary.get("eval") or {}).items()
               if isinstance(r, dict) and isinstance(r.get("after"), (int, float))}
    for task, r in results.items():
        m[f"acc_{task}"] = 100.0 * r["after"]
    groups = {"": list(results.values()), "_seen_tasks": [r for r in results.values() if r.get("trained", True)],
              "_unseen_tasks": [r for r in results.values() if r.get("trained") is False]}
    for suffix, rs in groups.items():
        if rs:  # _seen_tasks wherever a trained task was scored: a finding's metric never depends on the data
            m["acc_mean" if suffix == "" else f"acc{suffix}"] = sum(100.0 * r["after"] for r in rs) / len(rs)
            if (loss := _mean([r.get("test_loss") for r in rs])) is not None:
                m[f"test_loss{suffix}"] = loss
    forgetting = summary.get("forgetting") or {}  # eval/forgetting.py: loss change on tasks not trained on
    if isinstance(forgetting.get("mean_change"), (int, float)):
        m["forgetting"] = float(forgetting["mean_change"])
    for task, r in (forgetting.get("tasks") or {}).items():
        if isinstance(r.get("change"), (int, float)):
            m[f"forgetting_{task}"] = float(r["change"])
    prefs = {n: r["after"]["accuracy"] for n, r in (summary.get("preference") or {}).items()}  # eval/preference.py
    for name, accuracy in prefs.items():
        m[f"pref_acc_{name}"] = 100.0 * accuracy
    if prefs:
        m["pref_acc_mean"] = 100.0 * sum(prefs.values()) / len(prefs)
    if m.get("steps") and "runtime_s" in m:
        m["step_s"] = m["runtime_s"] / m["steps"]  # seconds per optimizer step
    if "final_val_loss" in m and "best_val_loss" in m:  # > 0: validation got worse after its best (overfitting)
        m["val_loss_rise"] = m["final_val_loss"] - m["best_val_loss"]
        if isinstance(summary.get("best_step"), (int, float)):
            m["best_val_step"] = float(summary["best_step"])  # where the curve turned up (the last step: never)
    if "stopped_early" in summary:
        m["stopped_early"] = float(bool(summary["stopped_early"]))
    if info and isinstance(info.get("wall_s"), (int, float)):
        m["wall_s"] = float(info["wall_s"])
    return m


@dataclass
class StudyResults:
    stats: dict    # {cell: {metric: Stat}} (a swept cell: its runs at the chosen point)
    runs: list     # one record per run: cell, seed, point, dir, status, wall_s, error, warnings
    sweeps: dict   # {cell: choose_point's dict + "rows": one per point with its mean metrics}
    curves: dict   # {cell: {step: Stat of val_loss}} from each run's val_history


def choose_point(study_dir: Path, cell: dict, select: str) -> dict:
    """A swept cell's choice: the point whose sweep-seed runs have the lowest mean `select` (a
    validation metric); points without a finished run are left out (None: no point finished)."""
    scores = {}
    for point, _ in cell["points"]:
        values = []
        for seed in cell["sweep_seeds"]:
            summary = load_json(run_dir(study_dir, cell["name"], seed, point) / "summary.json")
            if summary is not None and select in (metrics := run_metrics(summary)):
                values.append(metrics[select])
        scores[point] = _mean(values)
    done = {p: v for p, v in scores.items() if v is not None}
    best = min(done, key=done.get) if done else None  # ties: the first listed
    names = [p for p, _ in cell["points"]]
    # the first or last point of the grid (a single key: its lowest or highest value): the best may lie beyond
    edge = best is not None and best in (names[0], names[-1])
    return {"point": best, "overrides": dict(cell["points"]).get(best, []), "select": select,
            "seeds": cell["sweep_seeds"], "scores": scores, "edge": edge}


def _read_run(run: Path) -> tuple[dict | None, dict]:
    return load_json(run / "summary.json"), load_json(run / "run_info.json", {}) or {}


def collect(study_dir: Path, plan: dict) -> StudyResults:
    """The study folder's runs read back: per-cell statistics, run records, sweeps, val curves."""
    stats: dict = {c["name"]: {} for c in plan["cells"]}
    runs, sweeps, curves = [], {}, {}
    select = plan.get("select", "final_val_loss")
    for cell in plan["cells"]:
        chosen, name = None, cell["name"]
        if cell.get("points"):
            sweeps[name] = choice = choose_point(study_dir, cell, select)
            chosen = choice["point"]
            choice["rows"] = []
            for point, overrides in cell["points"]:  # every point's sweep runs, for the sweep table
                point_stats: dict = {}
                for seed in cell["sweep_seeds"]:
                    summary, info = _read_run(run_dir(study_dir, name, seed, point))
                    if point != chosen:
                        runs.append(_record(name, seed, point, run_dir(study_dir, name, seed, point), summary, info))
                    for k, v in (run_metrics(summary, info) if summary is not None else {}).items():
                        point_stats.setdefault(k, Stat()).values.append(v)
                choice["rows"].append({"point": point, "overrides": overrides, "stats": point_stats})
        for seed in cell["seeds"]:
            folder = run_dir(study_dir, name, seed, chosen)
            summary, info = _read_run(folder)
            runs.append(_record(name, seed, chosen, folder, summary, info))
            for k, v in (run_metrics(summary, info) if summary is not None else {}).items():
                if math.isfinite(v):
                    stat = stats[name].setdefault(k, Stat(seeds=[]))
                    stat.values.append(v)
                    stat.seeds.append(seed)  # what pairs this cell's runs with another cell's (stats.py)
            for record in (summary or {}).get("val_history") or []:
                if isinstance(record.get("val_loss"), (int, float)) and math.isfinite(record["val_loss"]):
                    curves.setdefault(name, {}).setdefault(record["step"], Stat()).values.append(record["val_loss"])
    return StudyResults(stats, runs, sweeps, curves)


def _record(cell: str, seed: int, point, folder: Path, summary, info) -> dict:
    status = "ok" if summary is not None else (info.get("status") or "not run")
    return {"cell": cell, "seed": seed, "point": point, "dir": folder, "status": status, "wall_s": info.get("wall_s"),
            "error": info.get("error") if summary is None else None, "reused_from": info.get("reused_from"),
            "warnings": (summary or {}).get("warnings", [])}


def estimate_stats(plan: dict) -> dict:
    """Estimate rows as one-value cells, so the same Findings checks apply to them."""
    stats = {}
    for row in plan.get("estimates", []):
        cell = stats.setdefault(row["name"], {})
        for key, metric in (("peak_gb", "estimate_gb"), ("article_gb", "article_gb")):
            if isinstance(row.get(key), (int, float)):
                cell[metric] = Stat([float(row[key])])
    return stats
