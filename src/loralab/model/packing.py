"""The model's half of packing: feeding a packed batch (loralab.data.layout) to a model, and the
one-time check that the model honours it.

A packed batch has `position_ids` that restart at 0 for each example. Passed with no 2D attention
mask, transformers (Llama, Qwen2, Mistral, ... via `masking_utils`) detects the restarts and builds
the block-diagonal causal mask for eager and SDPA attention, so examples sharing a row never see
each other. A model that ignores them would let examples mix: `packing_supported` finds out.
A CPU 'auto' model gets a micro batch's rows end to end in one row instead, and its attention
computes them as blocks (model.attention.BLOCKS); the check then runs that attention.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..data.layout import collate_packed
from ..data.prompts import Encoded
from .attention import attention_for_rows


def packed_inputs(batch: dict) -> dict:
    """Keyword arguments for the model: a packed batch passes position_ids and no 2D mask (the
    model derives the block-diagonal causal mask); a plain batch passes its attention_mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@contextmanager
def positions_into(module: torch.nn.Module, position_ids: torch.Tensor):
    """While active, every call of `module` gets these position_ids and no 2D attention mask
    (the loss calls the decoder body and the whole model in several ways; this reaches them all)."""
    def hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows, cols = ids.shape if ids is not None else position_ids.shape
        kwargs["position_ids"] = position_ids[:rows, :cols]  # a caller may run a prefix of the rows or positions
        kwargs["attention_mask"] = None
        return args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def packing_supported(model, pad_id: int, vocab_size: int | None = None) -> bool:
    """One-time check that the model honours packed position ids (restarting positions give a
    block-diagonal causal mask): two short random examples packed in one row must give the logits
    each gives alone. False for models whose attention ignores them; the loop then falls back to
    padded batches (with a warning), since packing would let examples attend to each other."""
    was_training, attention = model.training, getattr(getattr(model, "config", None), "_attn_implementation", None)
    model.eval()
    try:
        vocab = vocab_size or model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        examples = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 5)]
        batch = collate_packed([Encoded(e, e) for e in examples], pad_id, capacity=12)  # one row
        attention_for_rows(model, 12, one_packed_row=True)  # what training will run on it
        batch = {k: v.to(device) for k, v in batch.items()}
        packed = model(**packed_inputs(batch), use_cache=False).logits[0].float()
        at = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e], device=device), use_cache=False).logits[0].float()
            if not torch.allclose(packed[at:at + len(e)], alone, rtol=2e-2, atol=2e-2 * alone.abs().max().item()):
                return False
            at += len(e)
        return True
    finally:
        model.train(was_training)
        if attention is not None and model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
