"""How a base layer stores its weight, so LoRA can wrap both layouts with one layer class:

  nn.Linear (and NF4Linear)    weight (out, in), y = x W^T + b
  transformers' Conv1D          weight (in, out), y = x W + b     (GPT-2, GPT, ...: PEFT's fan_in_fan_out)

The LoRA factors never depend on it (A: r x in, B: out x r, in either case, as PEFT keeps them); only
the code that reads or rewrites the frozen weight itself (merge, DoRA's norms, PiSSA / OLoRA) does,
and it goes through `dense_weight` / `write_weight` here, which always speak (out, in).

No torch import: the memory estimate reads layer widths through this module and stays light.
"""
from __future__ import annotations

import sys


def is_conv1d(m) -> bool:
    """transformers' Conv1D. Looked up in sys.modules rather than imported: a model holding one has
    imported it already, and a model without one should not pay for importing transformers."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(m, mod.Conv1D)


def fan_in_fan_out(m) -> bool:
    """Whether the layer came from a weight stored (in, out): a Conv1D, or an NF4Linear quantized
    from one (which stores (out, in) but must be written back, merged or adapted, as a Conv1D)."""
    return is_conv1d(m) or bool(getattr(m, "fan_in_fan_out", False))


def features(m) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like layer, None for anything else."""
    if is_conv1d(m):
        n_in, n_out = m.weight.shape
        return int(n_in), int(n_out)
    if hasattr(m, "in_features") and hasattr(m, "out_features"):
        return int(m.in_features), int(m.out_features)
    return None


def dense_weight(m):
    """The frozen weight as (out, in) in fp32, a fresh tensor: dequantized for a quantized layer,
    transposed for a Conv1D."""
    if callable(getattr(m, "dequantize", None)):
        return m.dequantize().float()
    w = m.weight.detach()
    w = w.t() if is_conv1d(m) else w
    dense = w.float()
    return dense.clone() if dense.data_ptr() == w.data_ptr() else dense  # fp32 already: .float() is w itself


def write_weight(m, weight) -> None:
    """Replace the frozen weight by `weight`, given (out, in): re-quantized for a quantized layer,
    transposed back for a Conv1D, cast to the layer's dtype."""
    if callable(getattr(m, "requantize_", None)):
        m.requantize_(weight)
    else:
        w = weight.t() if is_conv1d(m) else weight
        m.weight.data = w.to(m.weight.dtype).contiguous()


def copy_weight_(m, weight) -> None:
    """Like write_weight for a dense layer, but in place (the same Parameter object and storage,
    so a weight shared with another module sees the change, as in-place merge expects)."""
    m.weight.copy_(weight.t() if is_conv1d(m) else weight)
