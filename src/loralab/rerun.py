"""A rerun of a finished run: the same command into the same output_dir (resume auto or true) finds
its work done and says so, instead of resuming from the final checkpoint only to evaluate again and
rewrite the same files. pipeline.py asks before the model loads.

A summary.json is this run's only if it was written for the config config.yaml holds (its
`config_sha256`): an attempt with another config (say, the evaluations a study's chosen sweep point
resumes for) rewrites config.yaml when it begins, and, stopped before its end, leaves the earlier
summary beside it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import RunConfig, dump_yaml
from .errors import UserError
from .train import checkpoint
from .train.optim import plan_steps


def config_sha256(cfg: RunConfig) -> str:
    """The fingerprint summary.json records of the config it was written for (config.yaml's text)."""
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()


def finished_summary(cfg: RunConfig, out: Path, data_sha256: str, n_train: int, world: int = 1) -> dict | None:
    """The finished run's summary.json when `out` holds this very run done: the resolved config as
    config.yaml recorded it, every planned step taken (the summary and the newest checkpoint agree)
    and the same training data (the checkpoint's fingerprint). Else None: the run goes ahead as
    before (resuming where it can), so any change (a key, the data, more steps) is trained."""
    if cfg.resume is False or any(out.rglob(".*.tmp")):  # a temp file: a save was cut short, redo it
        return None
    try:
        if (out / "config.yaml").read_text() != dump_yaml(cfg):
            return None
        summary = json.loads((out / "summary.json").read_text())
        if not isinstance(summary, dict) or summary.get("config_sha256") != config_sha256(cfg):
            return None  # another config's, or a summary from before summaries said which
        last = checkpoint.latest(out / "checkpoints")
        # read back whole (checksums verified), as a resume would: a damaged one is the resume's to report
        snap = checkpoint.load(last) if last is not None else None
    except (OSError, ValueError, UserError):  # a file missing or unreadable: not provably finished
        return None
    total = plan_steps(n_train, cfg.train, world)
    if not isinstance(summary, dict) or snap is None or summary.get("steps") != total \
            or snap["step"] != total or snap.get("data_sha256") not in (None, data_sha256):
        return None
    return summary
