"""Sweeps: a cell compared at its own best settings, chosen on the validation set.

A cell with `sweep: {train.lr: [5e-4, 1e-3, 2e-3]}` (or a study-level `sweep` that every training
cell without its own inherits) runs each point of the grid on its first `sweep_seeds` seeds,
validating only (spec.VALIDATION_ONLY); the point with the lowest validation metric (`select`:
final_val_loss by default, the mean over those seeds) becomes the cell, and the cell's other seeds run
at that point only. Findings then compare each cell at its best against the others at theirs, on the
held-out test (accuracy, test loss), which the choice never saw. The sweep seeds' runs at the chosen
point count as the cell's runs: each is run again with the cell's evaluations, which resumes it at its
last checkpoint (eval.* keys never change a run's training) and only evaluates.

Folder layout: a swept cell's runs live in cells/<cell>/<point>/seed-<s> (a plain cell's in
cells/<cell>/seed-<s>), and cells/<cell>/chosen.json records the choice and every point's score.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from ..errors import UserError

SELECT_METRICS = ("final_val_loss", "best_val_loss")  # validation only: the test set never chooses


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "point"


def expand_points(sweep, where: str) -> list[list]:
    """A sweep mapping (key -> values) -> [[point name, [overrides]], ...], the full grid, named
    after each key's last part and value (lr-0.001)."""
    if not isinstance(sweep, dict) or not sweep:
        raise UserError(f"{where} must map config keys to lists of values, e.g. {{train.lr: [1e-3, 2e-3]}}, "
                        f"got {sweep!r}")
    for key, values in sweep.items():
        if not isinstance(values, list) or len(values) < 2:
            raise UserError(f"{where}.{key} must list at least two values, got {values!r}")
    points = []
    for combo in itertools.product(*sweep.values()):
        pairs = list(zip(sweep, combo))
        name = "_".join(_slug(f"{k.rsplit('.', 1)[-1]}-{v}") for k, v in pairs)
        points.append([name, [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in pairs]])
    names = [p[0] for p in points]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: two points share a name ({', '.join(names)}); give distinct values")
    return points


def run_dir(out: Path, cell: str, seed: int, point: str | None = None) -> Path:
    """Where one run of a cell lives (a swept cell's under its point's folder)."""
    base = Path(out) / "cells" / cell
    return (base / point if point else base) / f"seed-{seed}"


def chosen_path(out: Path, cell: str) -> Path:
    return Path(out) / "cells" / cell / "chosen.json"


def read_chosen(out: Path, cell: str) -> str | None:
    """The point a swept cell settled on (runner.py writes it once the sweep runs are done)."""
    try:
        return json.loads(chosen_path(out, cell).read_text()).get("point")
    except (OSError, ValueError):
        return None
