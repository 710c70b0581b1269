"""The causal-LM loss as a (sum, count) pair, so callers can normalise per token over any span.

Gradient accumulation needs the token count of the whole accumulated batch before it divides;
returning the sum keeps that decision with the caller (the training loop).

Speed and memory: the output layer is the most expensive matmul of a small model (49k vocabulary
for SmolLM2), and most positions of an instruction example carry no label. `loss_sum` therefore
runs the decoder body, keeps only the hidden states of labelled positions, and applies the output
layer to those alone, in row chunks whose logits are recomputed in backward instead of stored.
Models whose head does more than a linear map (logit soft-capping, scaling) are detected by a
one-time comparison with the model's own logits and fall back to the plain path. Packed batches
(restarting position ids, loralab.model.packing) and batches with a shared prefix
(loralab.model.shared_prefix) go through the same code.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batching import collate, rank_share
from ..data.prompts import IGNORE_INDEX
from ..model.attention import attention_for_rows
from ..model.head import SELECTED_HEAD, body, body_and_head, head_matches
from ..model.packing import packed_inputs, positions_into
from ..model.shared_prefix import shared_prefix_inputs
from .distributed import SINGLE, Dist, all_sum

CHUNK_ROWS = 1024  # labelled positions per output-layer chunk: bounds logits memory to rows x vocab
FROZEN_HEAD_ROWS = 256  # a frozen head's chunks: its logits live only inside forward, so smaller is free


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: labels shifted by one, not masked."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _head_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 for the softmax: bf16 logits over a large vocabulary lose too much precision in the sum.
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


GRAD_SCALE = "loss_grad_scale"  # batch key: the factor backward will bring (1 / the step's label count)


class _FrozenHeadCE(torch.autograd.Function):
    """Sum of cross-entropy of a frozen linear head over rows, its gradient with respect to the
    hidden states computed in forward, chunk by chunk (scale x (softmax - one-hot) @ W, what
    backward would compute): only that (rows x hidden) gradient is kept, no logits, and nothing
    is recomputed. `scale` is the gradient backward is expected to bring (the step's 1 / label
    count), applied before the rounding into the compute dtype as autograd applies it, so bf16
    gradients round as autograd's do; backward corrects for any other incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, labels, weight, bias, chunk_rows: int, scale: float):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], chunk_rows):
            logits = F.linear(hidden[i:i + chunk_rows], weight, bias)
            y = labels[i:i + chunk_rows, None]
            z = logits.float()  # fp32, as _head_ce_sum's loss
            lse = torch.logsumexp(z, -1, keepdim=True)
            total += (lse - z.gather(1, y)).sum()
            probs = z.sub_(lse).exp_()  # softmax, in place of the fp32 copy
            probs.scatter_add_(1, y, probs.new_full(y.shape, -1.0)).mul_(scale)  # d(scale x CE sum)/d(logits)
            grad[i:i + chunk_rows] = probs.to(logits.dtype) @ weight.to(logits.dtype)
        ctx.save_for_backward(grad)
        ctx.scale = scale
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        ratio = g.float() / ctx.scale
        if bool(ratio == 1):  # the expected gradient: already applied, exactly
            return grad, None, None, None, None, None
        return grad * ratio.to(grad.dtype), None, None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def selected_head_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                       chunk_rows: int = CHUNK_ROWS, grad_scale: float = 1.0) -> torch.Tensor:
    """Sum of cross-entropy of head(hidden) against labels over rows, never holding more than
    chunk_rows x vocab logits. A frozen linear head (LoRA's) keeps none for backward
    (_FrozenHeadCE, chunks of FROZEN_HEAD_ROWS); a trained one keeps one chunk's, and with several
    chunks each one's logits are recomputed in backward. grad_scale: the gradient backward will
    bring to the sum (see _FrozenHeadCE; any value is correct, the expected one rounds as autograd)."""
    if _frozen_linear(head) and torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadCE.apply(hidden, labels, head.weight, head.bias, min(chunk_rows, FROZEN_HEAD_ROWS),
                                   float(grad_scale))
    if hidden.shape[0] <= chunk_rows:
        return _head_ce_sum(head, hidden, labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk_rows):
        total = total + checkpoint(_head_ce_sum, head, hidden[i:i + chunk_rows], labels[i:i + chunk_rows],
                                   use_reentrant=False)
    return total


def _plain_inputs(batch: dict) -> dict:
    return {**packed_inputs(batch), "use_cache": False}


def full_logits_loss_sum(model, batch: dict, inputs: dict | None = None) -> tuple[torch.Tensor, int]:
    """The plain path: the model's own logits at every position."""
    out = model(**(inputs or _plain_inputs(batch)))
    logits = out.logits[:, :-1, :]
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())


def _selected_loss_sum(parts, batch: dict, inputs: dict, chunk_rows: int) -> tuple[torch.Tensor, int]:
    body, head = parts
    out = body(**inputs)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden = out.last_hidden_state[:, :-1][keep]
    return (selected_head_loss(head, hidden, labels[keep], chunk_rows, batch.get(GRAD_SCALE, 1.0)),
            int(keep.sum()))


def _plain_or_selected(model, batch: dict, chunk_rows: int) -> tuple[torch.Tensor, int]:
    parts = body_and_head(model)
    if parts is not None and not hasattr(model, SELECTED_HEAD):  # not converted (model/convert.py): check once
        setattr(model, SELECTED_HEAD, head_matches(model, batch["input_ids"]))
    inputs = shared_prefix_inputs(model, batch) if "shared_prefix" in batch else _plain_inputs(batch)
    if parts is not None and getattr(model, SELECTED_HEAD):
        return _selected_loss_sum(parts, batch, inputs, chunk_rows)
    return full_logits_loss_sum(model, batch, inputs)


def loss_sum(model, batch: dict, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over unmasked labels (fp32), and how many tokens it covers.
    A packed batch (with position_ids) feeds every call of the decoder body its restarting positions;
    one with a shared prefix (in each row once) gets its mask from loralab.model.shared_prefix.
    A CPU model on 'auto' attention switches to what the batch's row length calls for, or, for a
    packed micro batch in one row, to the attention that computes its examples as blocks."""
    if "position_ids" not in batch or "shared_prefix" in batch:
        attention_for_rows(model, batch["input_ids"].shape[1])
        return _plain_or_selected(model, batch, chunk_rows)
    attention_for_rows(model, batch["input_ids"].shape[1], one_packed_row=batch["input_ids"].shape[0] == 1)
    with positions_into(body(model), batch["position_ids"]):
        return _plain_or_selected(model, batch, chunk_rows)


class LossModule(torch.nn.Module):
    """The model with the loss as its forward: `module(batch) -> (loss sum, label count)`. The unit
    the step calls, and the one DDP / FSDP2 wrap, so their hooks see every forward the loss makes."""

    def __init__(self, model: torch.nn.Module, chunk_rows: int = CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, batch, self.chunk_rows)


def as_loss_module(module: torch.nn.Module) -> torch.nn.Module:
    """`module` if it computes the loss already (a LossModule, or DDP around one), else one around it."""
    if isinstance(module, LossModule) or isinstance(getattr(module, "module", None), LossModule):
        return module
    return LossModule(module)


@torch.no_grad()
def mean_loss(module, data: list, *, batch_size: int, pad_id: int, dist: Dist = SINGLE,
              layout: Callable[[list], dict] | None = None) -> float:
    """Mean next-token loss per unmasked label token over encoded examples (validation). With
    several ranks each takes its share of every batch_size x world examples, and the sums meet.
    `layout` collates a batch's examples (default: padded rows; the loop passes training's layout)."""
    module = as_loss_module(module)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size * dist.world):
        share, weight = rank_share(data[i:i + batch_size * dist.world], dist.rank, dist.world)
        batch = layout(share) if layout else collate(share, pad_id)
        s, n = module({k: v.to(device) for k, v in batch.items()})
        total, count = total + weight * float(s), count + weight * n
    total, count = all_sum(dist, total, count)
    module.train(was_training)
    return total / max(count, 1)
