"""Reading a study folder back: each run's summary.json (and run_info.json) as numbers, gathered
per cell into `report.Stat`s for report.py. Pure reading: nothing here launches or writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .stats import Stat

# Metrics read from each run's summary.json (accuracy is added per task as acc_<task>, in percent).
SUMMARY_METRICS = ("final_train_loss", "final_val_loss", "best_val_loss", "runtime_s", "tokens_per_s",
                   "trainable_params", "steps", "epochs")

def load_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def run_metrics(summary: dict, info: dict | None = None) -> dict[str, float]:
    """One run's numbers, flattened: summary fields, peak memory in MB, accuracy per task in %."""
    m = {k: float(summary[k]) for k in SUMMARY_METRICS
         if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)}
    if isinstance(summary.get("peak_memory_bytes"), (int, float)):
        m["peak_memory_mb"] = summary["peak_memory_bytes"] / 2**20
    accs = [m.setdefault(f"acc_{task}", 100.0 * r["after"]) for task, r in (summary.get("eval") or {}).items()
            if isinstance(r, dict) and isinstance(r.get("after"), (int, float))]
    if accs:
        m["acc_mean"] = sum(accs) / len(accs)
    if m.get("steps") and "runtime_s" in m:
        m["step_s"] = m["runtime_s"] / m["steps"]  # seconds per optimizer step
    if "final_val_loss" in m and "best_val_loss" in m:  # > 0: validation got worse after its best (overfitting)
        m["val_loss_rise"] = m["final_val_loss"] - m["best_val_loss"]
    if "stopped_early" in summary:
        m["stopped_early"] = float(bool(summary["stopped_early"]))
    if info and isinstance(info.get("wall_s"), (int, float)):
        m["wall_s"] = float(info["wall_s"])
    return m


def collect(study_dir: Path, plan: dict) -> tuple[dict, list]:
    """({cell: {metric: Stat}}, [per-run record]) from the run folders named in the plan."""
    stats: dict = {c["name"]: {} for c in plan["cells"]}
    runs = []
    for cell in plan["cells"]:
        for seed in cell["seeds"]:
            run_dir = study_dir / "cells" / cell["name"] / f"seed-{seed}"
            summary = load_json(run_dir / "summary.json")
            info = load_json(run_dir / "run_info.json", {}) or {}
            status = "ok" if summary is not None else (info.get("status") or "not run")
            runs.append({"cell": cell["name"], "seed": seed, "dir": run_dir, "status": status,
                         "wall_s": info.get("wall_s"), "error": info.get("error") if summary is None else None,
                         "warnings": (summary or {}).get("warnings", [])})
            for k, v in (run_metrics(summary, info) if summary is not None else {}).items():
                if math.isfinite(v):
                    stats[cell["name"]].setdefault(k, Stat()).values.append(v)
    return stats, runs


def estimate_stats(plan: dict) -> dict:
    """Estimate rows as one-value cells, so the same Findings checks apply to them."""
    stats = {}
    for row in plan.get("estimates", []):
        cell = stats.setdefault(row["name"], {})
        for key, metric in (("peak_gb", "estimate_gb"), ("article_gb", "article_gb")):
            if isinstance(row.get(key), (int, float)):
                cell[metric] = Stat([float(row[key])])
    return stats
