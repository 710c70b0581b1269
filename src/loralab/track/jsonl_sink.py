"""metrics.jsonl: one JSON line per loop record, appended and flushed as it happens (the default sink)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.fileio import atomic_write_text
from .base import Tracker


class JsonlTracker(Tracker):
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if resume_step and path.exists():  # drop the lines logged after the checkpoint we resume from
            lines = [l for l in path.read_text().splitlines() if l.strip()]
            keep = [l for l in lines if json.loads(l).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(l + "\n" for l in keep))
        self.file = open(path, "a" if resume_step else "w")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.file.close()
