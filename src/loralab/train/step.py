"""One optimizer step: accumulate gradients over micro batches, normalise per label token of the
whole (global) batch, clip, check for NaN/Inf, step. The unit the loop repeats; with several ranks
each runs it on its share and the gradients meet in DDP's / FSDP2's hooks."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.layout import input_tokens
from .distributed import SINGLE, Dist, all_sum, full, grad_sync
from .loss import GRAD_SCALE, as_loss_module, count_label_tokens
from .preference import NORMS

WEIGHT = "loss_weight"  # a micro batch's weight in the step: 0 for a rank's stand-in when its share is empty


@dataclass
class StepResult:
    loss_sum: float               # summed token loss over the step's micro batches (all ranks)
    n_label: int                  # label tokens the gradient was normalised by (all ranks)
    n_tokens: int                 # non-padding input tokens fed to the model (all ranks)
    grad_norm: float | None       # before clipping; None when train.max_grad_norm is off
    problem: str | None           # "loss" / "gradient norm" when non-finite: no update was made
    extra: dict | None = None     # a preference objective's means over the step's pairs (train/preference.py)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_label, 1)


def accumulate_gradients(model, micro_batches: list[dict], *, autocast: bool = False,
                         dist: Dist = SINGLE) -> tuple[float, int, int]:
    """Backward over micro batches, normalised per label token over all of them together (on every
    rank), so the gradient equals that of one big batch. `model` is a model or its LossModule
    (wrapped for DDP / FSDP2). Returns (summed loss, label tokens, input tokens), summed over ranks."""
    module = as_loss_module(model)
    device = next(module.parameters()).device
    weights = [b.get(WEIGHT, 1.0) for b in micro_batches]
    if hasattr(getattr(module, "module", module), "take_stats"):  # preference objectives normalise per pair
        return _accumulate_pairs(module, micro_batches, weights, device, autocast, dist)
    (n_label,) = all_sum(dist, sum(w * count_label_tokens(b["labels"]) for w, b in zip(weights, micro_batches)))
    # DDP and FSDP2 average gradients over the ranks; dividing each rank's sum by n_label / world
    # makes that average the global batch's sum over n_label.
    norm = n_label / dist.world
    total, n_tokens = 0.0, 0.0
    for i, (w, b) in enumerate(zip(weights, micro_batches)):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items() if k != WEIGHT}
        b[GRAD_SCALE] = 1.0 / norm  # what backward brings to the loss sum (a frozen head rounds as autograd)
        with grad_sync(module, dist, sync=i == len(micro_batches) - 1), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            s, _ = module(b)
        (s / norm if w else s * 0.0).backward()
        total += w * float(s.detach())
        n_tokens += w * input_tokens(b)
    total, n_tokens = all_sum(dist, total, n_tokens)
    return total, int(n_label), int(n_tokens)


def _accumulate_pairs(module, micro_batches, weights, device, autocast, dist) -> tuple[float, int, int, dict]:
    """accumulate_gradients for train/preference.py's objectives: the global batch's (pairs, chosen answer
    tokens) summed first and handed to every micro batch, whose loss is then its share of the global mean
    (times the ranks: DDP / FSDP2 average). Returns (mean loss x pairs, pairs, input tokens, the stats' means)."""
    inner = getattr(module, "module", module)
    own = [inner.counts(b) for b in micro_batches]
    counts = all_sum(dist, *(sum(w * c[k] for w, c in zip(weights, own)) for k in range(2)))
    norms = torch.tensor(counts, dtype=torch.float32) / dist.world
    inner.take_stats()
    total, n_tokens, stats = 0.0, 0.0, {}
    for i, (w, b) in enumerate(zip(weights, micro_batches)):
        b = {k: v.to(device, non_blocking=True) for k, v in b.items() if k != WEIGHT}
        b[NORMS] = norms.to(device)
        with grad_sync(module, dist, sync=i == len(micro_batches) - 1), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            s, _ = module(b)
        (s if w else s * 0.0).backward()
        total += w * float(s.detach())
        n_tokens += w * input_tokens(b)
        for k, v in inner.take_stats().items():  # a stand-in (weight 0) counts for nothing
            stats[k] = stats.get(k, 0.0) + w * v
    keys = list(stats)
    total, n_tokens, *sums = all_sum(dist, total, n_tokens, *stats.values())
    pairs = counts[0]
    return total * pairs / dist.world, int(pairs), int(n_tokens), {k: v / max(pairs, 1) for k, v in zip(keys, sums)}


def train_step(model, micro_batches: list[dict], optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], *, max_grad_norm: float | None = None,
               autocast: bool = False, dist: Dist = SINGLE) -> StepResult:
    """One optimizer step over `micro_batches`. A non-finite loss or gradient norm makes no update
    (the caller decides whether that stops the run); gradients are cleared either way. Every rank
    sees the same loss and norm, so they all decide alike."""
    total, n_label, n_tokens, *extra = accumulate_gradients(model, micro_batches, autocast=autocast, dist=dist)
    grad_norm = None
    if max_grad_norm:
        grad_norm = float(full(torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)))
    problem = "loss" if not math.isfinite(total) else (
        "gradient norm" if grad_norm is not None and not math.isfinite(grad_norm) else None)
    if problem is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, n_label, n_tokens, grad_norm, problem, extra[0] if extra else None)
