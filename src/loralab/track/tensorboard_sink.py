"""TensorBoard event files in <output_dir>/tensorboard (the `loralab[track]` extra), written with
torch's SummaryWriter: scalars by track.names, the resolved config as HParams (with the final
metrics), and summary.json as text."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .base import Tracker
from .names import eval_metrics, step_metrics, summary_metrics


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path, resume_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("config key 'train.report_to': tensorboard needs the tensorboard package "
                            "(pip install 'loralab[track]')") from None
        # A resumed run hides what the interrupted one logged after its checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)
        self.log_dir = Path(log_dir)
        self.params: dict = {}
        self.step = 0

    def _scalars(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def start(self, params, tags):
        self.params = params
        if tags:
            self.writer.add_text("tags", json.dumps(tags), global_step=0)

    def log(self, record):
        self.step = record["step"]
        self._scalars(step_metrics(record), record["step"])

    def log_eval(self, results, step):
        self._scalars(eval_metrics(results), step)

    def finish(self, summary):
        from torch.utils.tensorboard.summary import hparams

        final = summary_metrics(summary)
        self._scalars(final, self.step)
        for event in hparams(self.params, final):  # the HParams tab: config beside the final numbers
            self.writer.file_writer.add_summary(event)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", global_step=self.step)

    def close(self, status="FINISHED"):
        self.writer.close()

    def where(self):
        return f"TensorBoard event files in {self.log_dir} (view: tensorboard --logdir {self.log_dir})"
