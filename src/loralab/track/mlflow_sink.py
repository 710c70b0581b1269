"""An MLflow run (the `loralab[track]` extra: mlflow-skinny), through MlflowClient.

Where: train.mlflow_uri, else $MLFLOW_TRACKING_URI, else a local file store in <output_dir>/mlruns.
MLflow 3 keeps file stores in maintenance mode and wants MLFLOW_ALLOW_FILE_STORE=true for them,
which is set (unless the environment says otherwise) whenever the store is a local folder.
The run: the resolved config as params, tags (studies: study, cell, seed), metrics by track.names,
summary.json as an artifact, and its final status. The run id is kept in <output_dir>/mlflow_run.json,
so a resumed run continues the same MLflow run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UserError
from ..io.fileio import write_json
from .base import Tracker
from .names import eval_metrics, step_metrics, summary_metrics

RUN_FILE = "mlflow_run.json"


def tracking_uri(out: Path, configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or (Path(out).resolve() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:  # a local file store: the one MLflow 3 wants an opt-in for
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class MlflowTracker(Tracker):
    def __init__(self, out: Path, run_name: str, experiment: str, uri: str | None, *, resumed: bool = False):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("config key 'train.report_to': mlflow needs the mlflow-skinny package "
                            "(pip install 'loralab[track]')") from None
        self.uri = tracking_uri(out, uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.out, self.run_name, self.experiment = Path(out), run_name, experiment
        self.resumed = resumed
        self.run_id: str | None = None
        self.step = 0

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # a parallel study run created it first
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def start(self, params, tags):
        from mlflow.entities import Param

        previous = self.out / RUN_FILE
        if self.resumed and previous.exists():
            kept = json.loads(previous.read_text())
            if kept.get("tracking_uri") == self.uri:
                self.run_id = kept["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
        run = self.client.create_run(self._experiment_id(), run_name=self.run_name,
                                     tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        write_json(previous, {"tracking_uri": self.uri, "run_id": self.run_id, "experiment": self.experiment})
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log(self, record):
        self.step = record["step"]
        self._metrics(step_metrics(record), record["step"])

    def log_eval(self, results, step):
        self._metrics(eval_metrics(results), step)

    def finish(self, summary):
        self._metrics(summary_metrics(summary), self.step)
        self.client.log_dict(self.run_id, summary, "summary.json")

    def where(self):
        if self.run_id is None:
            return None
        view = f" (view: mlflow ui --backend-store-uri {self.uri})" if self.uri.startswith("file:") else ""
        return f"MLflow run {self.run_id} in experiment {self.experiment!r} at {self.uri}{view}"

    def close(self, status="FINISHED"):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
