"""The loop's resumable state: seeds and RNG streams, and the snapshot a checkpoint holds."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .distributed import SINGLE, Dist, gather, load_optimizer_state, optimizer_state, trainable_state


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
    train_tokens: int = 0             # the examples' tokens trained on (no padding; a shared prefix once per example)
    runtime_s: float = 0.0
    history: list = field(default_factory=list)      # one dict per logged step
    val_history: list = field(default_factory=list)  # {"step", "val_loss"}
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    skipped_steps: int = 0            # non-finite batches skipped (train.skip_nonfinite)
    stopped_early: bool = False       # validation loss stopped improving (train.early_stopping_patience)
    interrupted: bool = False         # should_stop() asked to stop (a signal)
    module: Any = field(default=None, repr=False)  # the LossModule as trained (wrapped for DDP / FSDP2)

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
    dist: Dist = SINGLE


def snapshot(state: LoopState) -> dict:
    """The loop's state as plain objects and whole tensors (checkpoint.save writes it to disk): every
    rank calls it (sharded tensors are gathered; each rank's RNG streams are collected, in rank order)."""
    r = state.result
    return {"step": state.step, "total_steps": state.total_steps,
            "trainable": trainable_state(state.model), "optimizer": optimizer_state(state.optimizer),
            "scheduler": state.scheduler.state_dict(), "rng": gather(state.dist, get_rng()),
            "result": {"history": r.history, "val_history": r.val_history, "train_tokens": r.train_tokens,
                       "runtime_s": r.runtime_s, "skipped_steps": r.skipped_steps,
                       "final_train_loss": r.final_train_loss}}


def restore(resume: dict, optimizer, scheduler, result: TrainResult) -> int:
    """Load a snapshot's optimizer, scheduler and history; returns the step to continue from.
    (The trainable weights are restored by the caller, the RNG after the data stream is positioned.)"""
    load_optimizer_state(optimizer, resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    r = resume["result"]
    result.history, result.val_history = list(r["history"]), list(r["val_history"])
    result.train_tokens, result.runtime_s = r["train_tokens"], r["runtime_s"]
    result.skipped_steps, result.final_train_loss = r["skipped_steps"], r["final_train_loss"]
    result.steps = resume["step"]
    return resume["step"]
