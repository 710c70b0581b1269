"""Runs a study takes from the studies beside it instead of training them again.

Presets share runs: optimizer and optimizers sweep the same AdamW and SGD cells, targets and rank
share their rank-16 cell. A (cell, seed) whose training a run in a sibling study folder (the same
parent, e.g. runs/studies/*) already made is not trained twice. Same training means the two configs
differ in no key that changes the trajectory: the rule a resume follows
(train/checkpoint.config_difference), so threads, tracking, the folder and eval.* may differ.

The earlier run's folder is copied in (its checkpoints hard-linked: a checkpoint is never written in
place, only replaced whole), then
  - kept as it is where it already holds what this run would report: made by the same code (the
    fingerprint of loralab's source files) and either this run only validates or both ran the same
    evaluations;
  - else run as usual: it resumes at the copied last checkpoint, which checks the training data's
    fingerprint, and runs only the evaluations (the sweeps' mechanism, sweeps.py).
run_info.json names the folder it came from (`reused_from`); its wall_s includes that run's, since
the result cost it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

from ..config import RunConfig, load_config
from ..errors import UserError
from ..prepare import resolve_config
from ..train import checkpoint
from ..train.precision import default_device
from .results import load_json

KEEP = ("cell.yaml", "run_info.json")  # this run's own: never copied over
EVAL_NEUTRAL = ("batch_size",)  # eval keys that change no reported number


@functools.cache
def code_fingerprint() -> str:
    """sha256 over loralab's source files: two runs with the same one computed the same way."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _resolved(run: Path) -> dict | None:
    """The config a run recorded (config.yaml, written by the run itself), resolved; None if unreadable."""
    try:
        return load_config(run / "config.yaml").to_dict()
    except (UserError, OSError, ValueError):
        return None


def _evals(cfg: dict) -> dict:
    return {k: v for k, v in cfg["eval"].items() if k not in EVAL_NEUTRAL}


def find(out: Path, where: Path, cfg: RunConfig, validate: bool) -> tuple[Path, bool] | None:
    """(a finished run with the same training as `cfg`, whether it can stand as this run unchanged),
    the first that can stand, else the first that can resume; None where no sibling study has one.
    Compared as the runs record their configs: with what depends on the machine decided (precision
    auto), so a run made on other hardware is never taken."""
    mine = resolve_config(cfg, default_device()).to_dict()
    resumable = None
    for info_path in sorted(Path(out).parent.glob("*/cells/**/run_info.json")):
        run = info_path.parent
        info = load_json(info_path, {}) or {}
        if run == where or info.get("status") != "ok" or not (run / "summary.json").is_file():
            continue
        other = _resolved(run)
        if other is None or checkpoint.config_difference(other, mine) is not None:
            continue
        same_evals = not info.get("validate_only") and _evals(other) == _evals(mine)
        if info.get("code") == code_fingerprint() and (validate or same_evals):
            return run, True
        if resumable is None and checkpoint.latest(run / "checkpoints") is not None:
            resumable = run
    return (resumable, False) if resumable else None


def adoptable(where: Path, validate: bool) -> bool:
    """Whether `where` may take a run from elsewhere: nothing of its own trained there yet, or only a
    copy that validated, which a run now wanting the evaluations may replace with a better copy."""
    if not (where / "summary.json").exists() and not (where / "checkpoints").exists():
        return True
    info = load_json(where / "run_info.json", {}) or {}
    return bool(info.get("reused_from")) and bool(info.get("validate_only")) and not validate


def copy_run(src: Path, where: Path) -> None:
    """Replace everything in `where` but this run's own files with `src`'s."""
    for item in where.iterdir():
        if item.name not in KEEP:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in KEEP or any(part.startswith(".") for part in rel.parts):  # its lock, temporary files
            continue
        target = where / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif rel.parts[0] == "checkpoints":
            try:
                os.link(path, target)
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(path, target)
        else:
            shutil.copy2(path, target)
