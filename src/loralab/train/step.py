"""One optimizer step: accumulate gradients over micro batches, normalise per label token, clip,
check for NaN/Inf, step. The unit the loop repeats (and that data parallelism wraps)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .loss import count_label_tokens, loss_sum


@dataclass
class StepResult:
    loss_sum: float               # summed token loss over the step's micro batches
    n_label: int                  # label tokens the gradient was normalised by
    n_tokens: int                 # non-padding input tokens fed to the model
    grad_norm: float | None    # before clipping; None when train.max_grad_norm is off
    problem: str | None        # "loss" / "gradient norm" when non-finite: no update was made

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_label, 1)


def accumulate_gradients(model, micro_batches: list[dict], *, autocast: bool = False,
                         n_label: int | None = None) -> tuple[float, int, int]:
    """Backward over micro batches, normalised per label token over all of them together, so the
    gradient equals that of one big batch. `n_label` is the count to normalise by (default: these
    micro batches'). Returns (summed loss, label tokens, input tokens)."""
    device = next(model.parameters()).device
    if n_label is None:
        n_label = sum(count_label_tokens(b["labels"]) for b in micro_batches)
    total, n_tokens = 0.0, 0
    for b in micro_batches:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            s, _ = loss_sum(model, b)
        (s / n_label).backward()
        total += float(s.detach())
        n_tokens += int(b["attention_mask"].sum())
    return total, n_label, n_tokens


def train_step(model, micro_batches: list[dict], optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], *, max_grad_norm: float | None = None,
               autocast: bool = False) -> StepResult:
    """One optimizer step over `micro_batches`. A non-finite loss or gradient norm makes no update
    (the caller decides whether that stops the run); gradients are cleared either way."""
    total, n_label, n_tokens = accumulate_gradients(model, micro_batches, autocast=autocast)
    grad_norm = None
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True))
    problem = "loss" if not math.isfinite(total) else (
        "gradient norm" if grad_norm is not None and not math.isfinite(grad_norm) else None)
    if problem is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, n_label, n_tokens, grad_norm, problem)
