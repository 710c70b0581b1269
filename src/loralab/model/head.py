"""The model as a decoder body and an output layer: the loss runs the body, keeps the hidden states of
labelled positions only and applies the output layer to those (train/loss.py). That is the model's own
forward only where its logits are the output layer applied to the body's last hidden state: no logit
soft-capping or scaling in between. `head_matches` checks it on a few positions."""
from __future__ import annotations

import torch

CHECK_POSITIONS = 16  # positions the check compares
SELECTED_HEAD = "_loralab_selected_head"  # on the model: True / False once decided (by convert.py or the loss)


def body_and_head(model):
    """(decoder body, output layer), or None where the model is not laid out that way."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or body is model:
        return None
    return body, head


def body(model):
    """The decoder body (the model itself where it has none apart)."""
    return getattr(model, getattr(model, "base_model_prefix", "model"), None) or model


@torch.no_grad()
def head_matches(model, input_ids: torch.Tensor | None = None) -> bool:
    """Whether head(body(x)) gives the model's logits (catches soft-capping, scaling and the like). A few
    positions of one row suffice, and keep it cheap: a whole row's logits in fp32, compared twice, would
    be a step's largest allocation on a large vocabulary."""
    parts = body_and_head(model)
    if parts is None:
        return False
    if input_ids is None:
        g = torch.Generator().manual_seed(0)
        vocab = model.get_input_embeddings().num_embeddings
        input_ids = torch.randint(0, vocab, (1, CHECK_POSITIONS), generator=g)
    input_ids = input_ids[:1, :CHECK_POSITIONS].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        ref = model(input_ids=input_ids, use_cache=False).logits
        b, h = parts
        mine = h(b(input_ids=input_ids, use_cache=False).last_hidden_state)
    finally:
        model.train(was_training)
    return ref.shape == mine.shape and torch.allclose(ref.float(), mine.float(), rtol=1e-3, atol=1e-3)
