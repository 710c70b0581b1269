"""The model's half of a shared prefix in training (the data's half: loralab.data.layout).

A micro batch laid out by `collate_shared` has rows that start with the k tokens every example
shares, followed by several examples' own tokens (positions from k). The model gets a 4D mask
built here: the prefix attends causally to itself, each example's tokens to the prefix and,
causally, to their own example. Each example's logits, loss and gradient are then the plain
batch's, up to summation order (the prefix's gradient is the sum over the examples that read it),
from fewer token positions: one prefix per row instead of one per example.

The mask is passed to the attention as is, so the model must run an attention that takes a 4D mask
(eager, eager_recompute, SDPA) and no sliding window; `shared_prefix_supported` checks a model
once, and the loop keeps the plain layout where it fails.
"""
from __future__ import annotations

import torch

from ..data.layout import collate_shared
from ..data.prompts import Encoded
from .attention import mask_for, visible
from .prefix_cache import full_attention_only

MASKED_KINDS = ("eager", "eager_recompute", "sdpa")  # attention that takes a 4D mask as given


def shared_prefix_inputs(model, batch: dict) -> dict:
    """The model's (or its decoder body's) keyword arguments for a collate_shared batch."""
    see = visible(batch["position_ids"], batch["attention_mask"], int(batch["shared_prefix"]))
    dtype = model.get_input_embeddings().weight.dtype
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
            "attention_mask": mask_for(see, model.config._attn_implementation, dtype)}


@torch.no_grad()
def shared_prefix_supported(model, pad_id: int) -> bool:
    """One-time check that the model takes a shared prefix: its attention honours a 4D mask, every
    layer attends fully, and two random examples with a common prefix, laid out in one row, give
    the logits each gives alone."""
    if model.config._attn_implementation not in MASKED_KINDS or not full_attention_only(model.config):
        return False
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        prefix = torch.randint(0, vocab, (4,), generator=g).tolist()
        examples = [prefix + torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 3)]  # row order
        batch = collate_shared([Encoded(e, e) for e in examples], pad_id, k=len(prefix))
        assert batch["input_ids"].shape[0] == 1  # one row: the second example sits after the first
        batch = {k: v.to(device) for k, v in batch.items()}
        shared = model(**shared_prefix_inputs(model, batch)).logits[0].float()
        at = len(prefix)
        for e in examples:
            own = len(e) - len(prefix)
            alone = model(input_ids=torch.tensor([e], device=device), use_cache=False).logits[0, -own:].float()
            if not torch.allclose(shared[at:at + own], alone, rtol=2e-2, atol=2e-2 * alone.abs().max().item()):
                return False
            at += own
        return True
    finally:
        model.train(was_training)
