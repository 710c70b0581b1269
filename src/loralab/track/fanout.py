"""`train.report_to` -> the sinks, and one Tracker that passes every event to each of them."""
from __future__ import annotations

from pathlib import Path

from .base import Tracker


class Trackers(Tracker):
    def __init__(self, sinks: list[Tracker]):
        self.sinks = sinks

    def start(self, params, tags):
        for s in self.sinks:
            s.start(params, tags)

    def log(self, record):
        for s in self.sinks:
            s.log(record)

    def log_eval(self, results, step):
        for s in self.sinks:
            s.log_eval(results, step)

    def finish(self, summary):
        for s in self.sinks:
            s.finish(summary)

    def close(self, status="FINISHED"):
        for s in self.sinks:
            s.close(status)

    def where(self) -> list[str]:
        return [line for s in self.sinks if (line := s.where())]


def open_trackers(report_to: list[str], out: Path, *, resume_step: int = 0, run_name: str | None = None,
                  experiment: str = "loralab", mlflow_uri: str | None = None) -> Trackers:
    """The sinks `train.report_to` names, writing under the run's output folder `out`. A resumed
    run (resume_step > 0) continues its records: later ones written before the checkpoint are dropped."""
    sinks: list[Tracker] = []
    name = run_name or Path(out).resolve().name
    for kind in dict.fromkeys(report_to):
        if kind == "jsonl":
            from .jsonl_sink import JsonlTracker

            sinks.append(JsonlTracker(Path(out) / "metrics.jsonl", resume_step))
        elif kind == "tensorboard":
            from .tensorboard_sink import TensorBoardTracker

            sinks.append(TensorBoardTracker(Path(out) / "tensorboard", resume_step))
        elif kind == "mlflow":
            from .mlflow_sink import MlflowTracker

            sinks.append(MlflowTracker(Path(out), name, experiment, mlflow_uri, resumed=resume_step > 0))
    return Trackers(sinks)
