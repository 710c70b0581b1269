"""torch.compile of the decoder blocks (config `train.compile`).

Where the step is bound by matmuls that compile does not speed up, the steady-state step time barely
changes, but peak memory drops: inductor fuses the elementwise work (RMSNorm, SiLU, rotary, dropout) and
recomputes it in backward instead of saving its intermediates. The price is a one-time compile at the
first step (much longer with a cold inductor cache), so it pays for memory on runs of minutes, not for
speed on short ones (docs/performance.md, "Levers").

Each block is compiled in place (`Module.compile`), with dynamic shapes since every batch has its
own length; all blocks share one compiled graph (same code, parameters are graph inputs), so the
compile cost does not grow with depth. The loss (chunked output layer) and the loop stay eager.
"""
from __future__ import annotations

from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the longest nn.ModuleList whose children all share one class (Llama's
    model.layers, GPT-2's transformer.h, ...). Empty when there is none."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def compile_blocks(model: nn.Module, *, dynamic: bool = True, backend: str = "inductor") -> int:
    """Compile every decoder block of `model` in place. Returns how many were compiled (0: none
    found, the model runs eager). Call after LoRA injection, so the adapters are compiled in."""
    import torch._dynamo

    blocks = decoder_blocks(model)
    # one graph serves all blocks, but each block instance gets its own guard entry
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(blocks) + 8)
    for block in blocks:
        block.compile(dynamic=dynamic, backend=backend)
    return len(blocks)
