"""A tiny twin of a loaded model: the same model class and config class, with its family's features kept
(sliding windows, soft-capping, extra norms, biases, attention sinks, experts, q/k norms, tied embeddings)
and every size shrunk (2 layers, 64 wide, 4 heads / 2 K/V heads, a small vocabulary), randomly initialised.

The converters' probe (probe.py) runs a rewrite on the twin and on an untouched copy and compares them:
what the rewrite does to the model's math shows at that size in milliseconds. The sliding window is cut
below the probe's example lengths, so a rewrite that attends past it fails the probe rather than going
unseen on short examples. Sizes the config does not name are left as they are.
"""
from __future__ import annotations

import copy

import torch

WIDTH, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 4, 2, 16, 2
INTERMEDIATE, EXPERT_INTERMEDIATE, EXPERTS, EXPERTS_PER_TOKEN = 96, 32, 4, 2
VOCAB = 160
WINDOW = 6  # shorter than every example the probe builds (probe.LENGTHS)

_SIZES = {  # config attribute -> the twin's value, where the config has it
    "hidden_size": WIDTH, "n_embd": WIDTH, "d_model": WIDTH,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS,
    "head_dim": HEAD_DIM,
    "intermediate_size": INTERMEDIATE, "n_inner": INTERMEDIATE, "ffn_dim": INTERMEDIATE,
    "moe_intermediate_size": EXPERT_INTERMEDIATE, "shared_expert_intermediate_size": EXPERT_INTERMEDIATE,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS_PER_TOKEN,
    "vocab_size": VOCAB,
}


def _layer_types(types: list) -> list:
    """Two layers' types that keep each kind the model has (a sliding and a full layer, say), in model order."""
    kinds = list(dict.fromkeys(types))[:LAYERS]
    picked = [types.index(k) for k in kinds]
    while len(picked) < LAYERS:
        picked.append(next(i for i in range(len(types)) if i not in picked))
    return [types[i] for i in sorted(picked)]


def twin_config(config):
    """A copy of `config` at the twin's sizes, its features kept."""
    c = copy.deepcopy(config)
    for key, value in _SIZES.items():
        if getattr(c, key, None) is not None and not isinstance(getattr(c, key), bool):
            setattr(c, key, value)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    kv = getattr(config, "num_key_value_heads", None)
    full_heads = getattr(config, "num_attention_heads", None)
    if kv is not None:  # grouped K/V stays grouped, multi-head stays multi-head
        c.num_key_value_heads = KV_HEADS if kv != full_heads else heads
    if getattr(c, "sliding_window", None):
        c.sliding_window = WINDOW
    if isinstance(getattr(c, "layer_types", None), list) and len(config.layer_types) >= LAYERS:
        c.layer_types = _layer_types(config.layer_types)
    for key in ("mlp_only_layers",):  # layer indices past the twin's depth
        if isinstance(getattr(c, key, None), list):
            setattr(c, key, [i for i in getattr(c, key) if i < LAYERS])
    for key in ("max_window_layers",):
        if isinstance(getattr(c, key, None), int):
            setattr(c, key, min(getattr(c, key), LAYERS))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(c, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(c, key, VOCAB - 1)
        elif isinstance(value, list):
            setattr(c, key, [v if v < VOCAB else VOCAB - 1 for v in value])
    c.use_cache = False
    return c


def build_twin(model, seed: int = 0):
    """The twin of `model` (same class), fp32, eager attention, in eval mode with every parameter trainable.
    Draws from its own generator's seed: the caller's RNG stream is left as it was."""
    config = twin_config(model.config)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = type(model)(config)
    twin.to(torch.float32).eval().requires_grad_(True)
    return twin
