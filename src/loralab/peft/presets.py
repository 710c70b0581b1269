"""The LoRA target presets and init names: the one table that training, adapters, the config, the
memory estimate and the CLI share. Pure data (no torch), so the estimate and the CLI stay light."""
from __future__ import annotations

import re

from ..errors import UserError

# The decoder linears of Llama-family models (Llama, Mistral, Qwen2, SmolLM2...) by short name.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_LAYER = "lm_head"

# Name-based presets list Llama-style short names; None marks the structural presets, which find
# every linear layer whatever the architecture calls it (with or without the output layer).
TARGET_PRESETS: dict[str, tuple[str, ...] | None] = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": None,        # every linear layer except the output layer
    "all-linear+head": None,   # ... and the output layer too
}
WITH_HEAD = "all-linear+head"


def llama_modules(preset: str) -> tuple[str, ...]:
    """The short names a preset selects in a Llama-family decoder (the memory estimate's view)."""
    names = TARGET_PRESETS[preset]
    if names is None:
        return LLAMA_LINEARS + ((OUTPUT_LAYER,) if preset == WITH_HEAD else ())
    return names


# How the factors start (init.py does it): PEFT's init_lora_weights values loralab implements.
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_N", "olora")
PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def check_init(init) -> str:
    """The init name, or a one-line error naming lora.init."""
    if init in ("kaiming", "gaussian", "pissa", "olora") or (isinstance(init, str) and PISSA_NITER.fullmatch(init)):
        return init
    raise UserError(f"config key 'lora.init' must be one of {', '.join(INITS)} (N: subspace iterations, "
                    f"e.g. pissa_niter_4), got {init!r}")


def mutates_base(init: str) -> bool:
    """PiSSA and OLoRA move part of the frozen weight into the factors."""
    return init == "olora" or init.startswith("pissa")


# `loralab combine` methods (combine.py), as PEFT's add_weighted_adapter names them; the pruning
# ones need a density.
COMBINE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
