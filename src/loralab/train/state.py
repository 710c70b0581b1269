"""The loop's resumable state: seeds and RNG streams, and the snapshot a checkpoint holds."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass
class TrainResult:
    steps: int = 0
    train_tokens: int = 0             # non-padding tokens fed to the model
    runtime_s: float = 0.0
    history: list = field(default_factory=list)      # one dict per logged step
    val_history: list = field(default_factory=list)  # {"step", "val_loss"}
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    skipped_steps: int = 0            # non-finite batches skipped (train.skip_nonfinite)
    stopped_early: bool = False       # validation loss stopped improving (train.early_stopping_patience)
    interrupted: bool = False         # should_stop() asked to stop (a signal)

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.runtime_s if self.runtime_s > 0 else 0.0


@dataclass
class LoopState:
    """Everything needed to continue a run exactly where it stopped."""
    step: int
    total_steps: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    result: TrainResult


def snapshot(state: LoopState) -> dict:
    """The loop's state as plain objects and tensors (checkpoint.save writes it to disk)."""
    r = state.result
    return {"step": state.step, "total_steps": state.total_steps,
            "trainable": {n: p.detach() for n, p in state.model.named_parameters() if p.requires_grad},
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "rng": get_rng(),
            "result": {"history": r.history, "val_history": r.val_history, "train_tokens": r.train_tokens,
                       "runtime_s": r.runtime_s, "skipped_steps": r.skipped_steps,
                       "final_train_loss": r.final_train_loss}}


def restore(resume: dict, optimizer, scheduler, result: TrainResult) -> int:
    """Load a snapshot's optimizer, scheduler and history; returns the step to continue from.
    (The trainable weights are restored by the caller, the RNG after the data stream is positioned.)"""
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    r = resume["result"]
    result.history, result.val_history = list(r["history"]), list(r["val_history"])
    result.train_tokens, result.runtime_s = r["train_tokens"], r["runtime_s"]
    result.skipped_steps, result.final_train_loss = r["skipped_steps"], r["final_train_loss"]
    result.steps = resume["step"]
    return resume["step"]
