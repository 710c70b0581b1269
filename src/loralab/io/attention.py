"""Which attention a loaded model runs: `model.attn_implementation` (auto | eager | eager_recompute | sdpa).

On CUDA 'auto' is SDPA (flash / memory-efficient kernels). On the CPU it depends on the compute
dtype, and in bf16 on the row length, switched per micro batch (`attention_for_rows`, called by the loss):
  - fp32: SDPA at every length, as fast as eager or faster, and linear in memory;
  - bf16, rows of up to `eager_max_row()` tokens: the model's own eager attention with its core (QK^T,
    softmax, dropout, AV) recomputed in backward (`eager_recompute`). Plain eager is the fastest
    there (SDPA's bf16 kernels are 8-16% slower per step), but keeps every layer's T x T
    probabilities for backward, in fp32 and bf16: a quarter of a step's saved activations at 256
    tokens. Recomputing them gives the same values bit for bit, keeps only q, k, v and the output,
    and costs 1-5% of a step;
  - bf16, longer rows: SDPA, faster than eager there. Where SDPA's bf16 kernels run on AMX tiles
    the crossing comes sooner (~200-300 tokens instead of ~1,000 with AVX512-BF16 alone).
Paired step times and saved bytes are in docs/performance.md (benchmarks/attention_rows.py).
"""
from __future__ import annotations

import sys

import torch
from torch.utils.checkpoint import checkpoint

from .cpu import has_amx

EAGER_MAX_ROW = 512                 # 'auto' on a bf16 CPU: eager_recompute up to here, SDPA beyond
EAGER_MAX_ROW_AMX = 256             # the same on a CPU with AMX, whose tiles run SDPA's block matmuls
RECOMPUTE = "eager_recompute"       # registered with transformers' AttentionInterface under this name
_AUTO_ATTR = "_loralab_attention_auto"  # set on models whose attention follows the row length


def _eager_recompute(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention module's own `eager_attention_forward` (its model's file defines it: soft-capping,
    sliding windows and all), run under non-reentrant checkpointing: backward recomputes it from
    q, k, v and the mask, with the same dropout draws (the RNG state is replayed)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:  # a model without the standard eager function: SDPA is lean too
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)

    def core(q, k, v, mask):
        return eager(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kwargs)[0]

    if not torch.is_grad_enabled():
        return core(query, key, value, attention_mask), None
    return checkpoint(core, query, key, value, attention_mask, use_reentrant=False), None


def register() -> None:
    """Make RECOMPUTE a name transformers knows (attention function and the eager mask), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if RECOMPUTE not in AttentionInterface._global_mapping:
        AttentionInterface.register(RECOMPUTE, _eager_recompute)
        AttentionMaskInterface.register(RECOMPUTE, eager_mask)


def eager_max_row() -> int:
    """The longest row 'auto' runs as eager_recompute on this bf16 CPU (SDPA beyond)."""
    return EAGER_MAX_ROW_AMX if has_amx() else EAGER_MAX_ROW


def cpu_choice(row_len: int, bf16: bool) -> str:
    """What 'auto' runs on the CPU for rows of row_len tokens, computing in bf16 or fp32."""
    return RECOMPUTE if bf16 and row_len <= eager_max_row() else "sdpa"


def pick_attention(choice: str, device: str | torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The implementation to load: 'auto' is SDPA on CUDA and, on the CPU, the short-row choice for
    weights of `dtype` (switched per batch by `attention_for_rows`)."""
    name = choice if choice != "auto" else (
        "sdpa" if torch.device(device).type == "cuda" else cpu_choice(1, dtype == torch.bfloat16))
    if name == RECOMPUTE:
        register()
    return name


def mark_auto(model, choice: str, device: str | torch.device) -> None:
    """Let a CPU model loaded with 'auto' follow its batches' row lengths."""
    if choice == "auto" and torch.device(device).type == "cpu":
        setattr(model, _AUTO_ATTR, True)


def attention_for_rows(model, row_len: int) -> None:
    """Switch a CPU 'auto' model to the attention its batch's rows call for (a no-op otherwise)."""
    if getattr(model, _AUTO_ATTR, False):
        bf16 = model.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        want = cpu_choice(row_len, bf16)
        if model.config._attn_implementation != want:
            if want == RECOMPUTE:
                register()  # a model loaded as SDPA (fp32 weights) meets bf16 autocast here
            model.set_attn_implementation(want)
