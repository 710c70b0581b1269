"""A tracker receives the run's events (fanout.Trackers passes each to every configured sink).

The pipeline calls, in order: start(params, tags), log(record) for every loop record (steps and
validations, metrics.jsonl's format), log_eval(results, step) for task evaluations before and after
training, finish(summary), and close(status) always (finished, failed or killed). After start, where()
says where the sink's records go (the run prints it, so a user finds their TensorBoard or MLflow run).
"""
from __future__ import annotations


class Tracker:
    """Base sink: every event is optional, so a sink implements only what it records."""

    def start(self, params: dict, tags: dict) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def log_eval(self, results: dict, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def where(self) -> str | None:
        """One line naming where this sink writes (None: nothing worth saying)."""
        return None
