"""The model's half of a shared prefix in training (the data's half: loralab.data.layout).

A micro batch laid out by `collate_shared` has rows that start with the k tokens every example
shares, followed by several examples' own tokens (positions from k). The model gets a 4D mask
built here: the prefix attends causally to itself, each example's tokens to the prefix and,
causally, to their own example. Each example's logits, loss and gradient are then the plain
batch's, up to summation order (the prefix's gradient is the sum over the examples that read it),
from fewer token positions: one prefix per row instead of one per example.

The mask is passed to the attention as is, so the model must run an attention that takes a 4D mask
(eager, eager_recompute, SDPA) and no sliding window; the `shared_prefix` converter checks that and
proves the layout on a tiny twin (model/convert.py), and the loop keeps the plain layout where it declines.
"""
from __future__ import annotations

from .attention import mask_for, visible

MASKED_KINDS = ("eager", "eager_recompute", "sdpa")  # attention that takes a 4D mask as given


def shared_prefix_inputs(model, batch: dict) -> dict:
    """The model's (or its decoder body's) keyword arguments for a collate_shared batch."""
    see = visible(batch["position_ids"], batch["attention_mask"], int(batch["shared_prefix"]))
    dtype = model.get_input_embeddings().weight.dtype
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
            "attention_mask": mask_for(see, model.config._attn_implementation, dtype)}
