"""The LoRA target presets: the one table that training, adapters, the memory estimate and the CLI
share. Pure data (no torch), so the estimate and the CLI stay light."""
from __future__ import annotations

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
