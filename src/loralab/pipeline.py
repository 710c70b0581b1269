"""`run_training(cfg)`: one training run, as `loralab train`, studies (one process per run) and the
benchmarks call it. The run itself is the run object (run.py: its phases, its files); this is
the function-shaped entry kept for those callers, with the run's evaluations re-exported."""
from __future__ import annotations

from .config import RunConfig
from .prepare import Datasets
from .run import Run, stop_flag
from .run_evals import held_out_stops, run_evals, test_losses

__all__ = ["Datasets", "Run", "held_out_stops", "run_evals", "run_training", "stop_flag", "test_losses"]


def run_training(cfg: RunConfig, *, quiet: bool = False, data: Datasets | None = None) -> dict:
    """Run one configured fine-tune end to end and write its artifacts. Returns the summary dict.

    `data` replaces the config's data (a benchmark's own workload); by default it is built from
    `cfg.data` and checked before the output folder is touched or the model loads. The output
    folder is locked for the run (a second run into it is refused)."""
    return Run(cfg, quiet=quiet, data=data).execute()
