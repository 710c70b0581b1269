"""Which attention a loaded model runs: `model.attn_implementation` (auto | eager | eager_recompute | sdpa),
and the attention of a packed micro batch laid out as one row (`packed_blocks`).

On CUDA 'auto' is SDPA (flash / memory-efficient kernels). On the CPU it depends on the compute
dtype, and in bf16 on the row length, switched per micro batch (`attention_for_rows`, called by the loss):
  - fp32: SDPA at every length, as fast as eager or faster, and linear in memory;
  - bf16, rows of up to `eager_max_row()` tokens: the model's own eager attention with its core (QK^T,
    softmax, dropout, AV) recomputed in backward (`eager_recompute`). Plain eager is the fastest
    there (SDPA's bf16 kernels are slower per step), but keeps every layer's T x T
    probabilities for backward, in fp32 and bf16: a large share of a step's saved activations at a
    few hundred tokens. Recomputing them gives the same values bit for bit, keeps only q, k, v and the
    output, and costs a few percent of a step;
  - bf16, longer rows: SDPA, faster than eager there. Where SDPA's bf16 kernels run on AMX tiles
    the crossing comes sooner (a few hundred tokens instead of about a thousand with AVX512-BF16 alone).
Paired step times and saved bytes are in docs/performance.md (benchmarks/experiments/attention_rows.py).

A CPU 'auto' model trains on packed micro batches laid out as ONE row with no padding
(data.layout.collate_packed(one_row=True)): rows as wide as the longest example leave padding between
the examples, which every linear layer, norm and LoRA product would compute.
Attention over the one row with a block-diagonal mask would cost the square of the micro batch's
tokens, so `packed_blocks` takes the row apart: its examples (where position ids restart at 0), in
order, in blocks no wider than the longest example (first-fit-decreasing rows, as the data laid
them out), as a batch of blocks with each block's causal block-diagonal mask, through what 'auto'
runs for rows that wide (SDPA with K and V at their own head count; for eager_recompute's short bf16 rows
eager's core with q's heads grouped per K/V head, `_grouped_recompute`); the outputs go back in place.
The same values as the padded rows.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.utils.checkpoint import checkpoint

from ..runtime.cpu import has_amx

EAGER_MAX_ROW = 512                 # 'auto' on a bf16 CPU: eager_recompute up to here, SDPA beyond
EAGER_MAX_ROW_AMX = 256             # the same on a CPU with AMX, whose tiles run SDPA's block matmuls
RECOMPUTE = "eager_recompute"       # registered with transformers' AttentionInterface under this name
BLOCKS = "packed_blocks"            # the same, for a packed micro batch in one row
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


def visible(position_ids: torch.Tensor, attention_mask: torch.Tensor, k: int = 0) -> torch.Tensor:
    """(rows, n, n) bool: which positions each position sees. Every row starts with a k-token
    prefix (k = 0: none); an example starts where the position is k. Real tokens see the earlier
    tokens of the prefix and of their own example; a padding position sees the same plus itself
    (never empty)."""
    n = position_ids.shape[1]
    example = (position_ids == k).cumsum(1)  # 0 on the prefix, i on the i-th example of the row
    same = example[:, :, None] == example[:, None, :]
    prefix = (example == 0)[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    see = (same | prefix) & causal & attention_mask.bool()[:, None, :]
    return see | torch.eye(n, dtype=torch.bool, device=position_ids.device)


def mask_for(see: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """visible()'s answer as the 4D mask attention `kind` takes as is: bool for SDPA, additive for eager."""
    see = see[:, None]
    return see if kind == "sdpa" else additive(see, dtype)


def additive(see: torch.Tensor, dtype: torch.dtype, hidden: float | None = None) -> torch.Tensor:
    """A bool mask as the additive one: 0 where seen, `hidden` elsewhere (default dtype's lowest)."""
    fill = torch.finfo(dtype).min if hidden is None else hidden
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, fill)


class _Blocks:
    """Where one packed row's examples go in the batch of blocks, and the blocks' mask: the last
    layout only (a micro batch's layers all share it)."""
    key, last = None, None

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> _Blocks:
        starts = (position_ids == 0).nonzero().flatten().tolist()
        n = position_ids.numel()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        lengths = tuple(b - a for a, b in zip(starts, [*starts[1:], n]))
        if cls.key != (lengths, position_ids.device):
            cls.key, cls.last = (lengths, position_ids.device), cls(lengths, position_ids.device)
        return cls.last

    def __init__(self, lengths: tuple, device: torch.device):
        self.width = max(lengths)
        blocks = [[]]
        for length in lengths:  # in order: each block as many whole examples as fit
            if sum(blocks[-1]) + length > self.width:
                blocks.append([])
            blocks[-1].append(length)
        self.count = len(blocks)
        gather = torch.zeros(self.count, self.width, dtype=torch.long)  # padding reads position 0 (masked away)
        positions = torch.zeros(self.count, self.width, dtype=torch.long)
        real = torch.zeros(self.count, self.width, dtype=torch.long)
        at = 0
        for b, block in enumerate(blocks):
            used = 0
            for length in block:
                gather[b, used:used + length] = torch.arange(at, at + length)
                positions[b, used:used + length] = torch.arange(length)
                real[b, used:used + length] = 1
                used, at = used + length, at + length
        self.gather = gather.flatten().to(device)
        self.scatter = real.flatten().nonzero().flatten().to(device)  # each position's place among the blocks
        self.see = visible(positions, real).to(device)
        self.masks: dict = {}

    def mask(self, kind: str, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """The blocks' mask for attention `kind`: additive in `dtype`, built once for every layer (SDPA
        too: given a bool mask, torch's CPU kernel builds and keeps a float copy in each layer). A sliding
        window hides what lies `window` or more positions back, as transformers' sliding_window_overlay."""
        window = window if window and window < self.width else None  # no row reaches that far: no window
        if (kind, dtype, window) not in self.masks:
            see = self.see
            if window is not None:
                at = torch.arange(self.width, device=see.device)
                near = at[:, None] - at[None, :] < window
                see = (see & near) | torch.eye(self.width, dtype=torch.bool, device=see.device)
            # -inf for SDPA: what torch's own conversion of a bool mask fills in
            self.masks[(kind, dtype, window)] = additive(see[:, None], dtype, -torch.inf if kind == "sdpa" else None)
        return self.masks[(kind, dtype, window)]


def _plain(module, kwargs: dict) -> bool:
    """Whether an attention call asks for no more than softmax(q k^T · scale + mask) v: no soft-capping, bias,
    sinks or returned weights (the blocks' own kernels compute only that; a sliding window lives in the mask).
    Sinks are an `s_aux` argument or a `sinks` parameter of the module (gpt-oss)."""
    return not kwargs.get("output_attentions") and getattr(module, "sinks", None) is None and \
        all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux"))


_FORCED: list = [None]  # the probe's choice of the blocks' kernel, else the row length's (cpu_choice)


@contextlib.contextmanager
def forced_kind(kind: str):
    """While active, packed blocks run `kind` (sdpa or eager_recompute) whatever the dtype and width: the
    converters' probe (model/probe.py) proves both kernels in fp32 on a tiny twin."""
    _FORCED[0] = kind
    try:
        yield
    finally:
        _FORCED[0] = None


def _grouped_core(query, key, value, mask, scaling):
    """softmax(q k^T · scaling + mask) v in the compute dtype, q's heads grouped per K/V head: what the model's
    eager function computes after repeating K and V to every query head, without the repeats (nor their
    gradients' sum), the scale applied to q, the mask added in place and softmax written in the compute
    dtype (torch's CPU kernel accumulates in fp32) instead of fp32 then a cast: faster than the eager core at
    the throughput bench's blocks in bf16 (docs/performance.md), the same values up to bf16 rounding."""
    b, heads, w, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scores = torch.bmm((query * scaling).reshape(b * kv_heads, groups * w, d),
                       key.reshape(b * kv_heads, w, d).transpose(1, 2))
    scores.view(b, kv_heads, groups, w, w).add_(mask.view(b, 1, 1, w, w))
    out = torch.bmm(torch.softmax(scores, -1), value.reshape(b * kv_heads, w, d))
    return out.view(b, heads, w, d).transpose(1, 2).contiguous()


def _grouped_recompute(module, query, key, value, mask, scaling, dropout=0.0, **kwargs):
    """The blocks' eager_recompute: `_grouped_core` under non-reentrant checkpointing (backward recomputes
    it from q, k, v and the mask). Calls with attention dropout or other options go to the model's own eager
    function."""
    if dropout or not _plain(module, kwargs):
        return _eager_recompute(module, query, key, value, mask, scaling, dropout, **kwargs)
    if not torch.is_grad_enabled():
        return _grouped_core(query, key, value, mask, scaling), None
    return checkpoint(_grouped_core, query, key, value, mask, scaling, use_reentrant=False), None


def _sdpa_blocks(module, query, key, value, mask, scaling, dropout=0.0, **kwargs):
    """SDPA over the batch of blocks, with K and V at their own head count (enable_gqa): transformers'
    SDPA path repeats them to every query head when a mask is given, and the kernel keeps the
    repeated copies for backward (three times K and V for SmolLM2's 3 KV heads of 9). The same outputs;
    K's and V's gradients sum over their heads in
    another order. Options this call does not take go to transformers' path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _plain(module, kwargs):
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _packed_blocks(module, query, key, value, attention_mask, scaling, dropout=0.0, position_ids=None, **kwargs):
    """Attention of a packed one-row batch in blocks of whole examples (see the module's docstring).
    Anything else (several rows, a KV cache, no position ids) runs SDPA with the mask given."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.pop("sliding_window", None)  # in the masks: transformers' own (eager_mask) and the blocks'
    plain = _plain(module, kwargs)
    if (position_ids is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]
            or position_ids.shape[-1] != query.shape[2]):
        if plain:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        return _eager_recompute(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    blocks = _Blocks.of(position_ids.reshape(-1))

    def split(t):  # (1, heads, n, d) -> (blocks, heads, width, d)
        return t[0].index_select(1, blocks.gather).unflatten(1, (blocks.count, blocks.width)).transpose(0, 1)

    kind = _FORCED[0] or cpu_choice(blocks.width, query.dtype == torch.bfloat16)
    if not plain:  # soft-capping, sinks, ...: the model's own eager function, on the blocks, with their mask
        kind, inner = "eager", _eager_recompute
    else:
        inner = _grouped_recompute if kind == RECOMPUTE else _sdpa_blocks
    out, _ = inner(module, split(query), split(key), split(value), blocks.mask(kind, query.dtype, window),
                   scaling=scaling, dropout=dropout, **kwargs)
    return out.flatten(0, 1).index_select(0, blocks.scatter).unsqueeze(0), None  # (1, n, heads, d)


_REGISTERED: list = []


def register() -> None:
    """Make RECOMPUTE and BLOCKS names transformers knows (attention function and mask), once.
    BLOCKS gets eager's (additive) mask for the calls it hands on whole; its own blocks build theirs."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RECOMPUTE, _eager_recompute)
    AttentionMaskInterface.register(RECOMPUTE, eager_mask)
    AttentionInterface.register(BLOCKS, _packed_blocks)
    AttentionMaskInterface.register(BLOCKS, eager_mask)  # never None: an eager fallback needs its mask
    _REGISTERED.append(True)


def eager_max_row() -> int:
    """The longest row 'auto' runs as eager_recompute on this bf16 CPU (SDPA beyond)."""
    return EAGER_MAX_ROW_AMX if has_amx() else EAGER_MAX_ROW


def cpu_choice(row_len: int, bf16: bool) -> str:
    """What 'auto' runs on the CPU for rows of row_len tokens, computing in bf16 or fp32."""
    return RECOMPUTE if bf16 and row_len <= eager_max_row() else "sdpa"


def pick_attention(choice: str, model_class=None) -> str:
    """The implementation to load: `choice`, where 'auto' is SDPA, or eager for a class that does not run SDPA
    (the `cpu_attention` converter then switches per micro batch, model/convert.py)."""
    if choice == "auto":
        return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"
    if choice == RECOMPUTE:
        register()
    return choice


def packs_one_row(model) -> bool:
    """Whether `model` trains on packed micro batches laid out as one row (a CPU 'auto' model)."""
    return getattr(model, _AUTO_ATTR, False)


def attention_for_rows(model, row_len: int, one_packed_row: bool = False) -> None:
    """Switch a CPU 'auto' model to the attention its batch's rows call for (a no-op otherwise):
    BLOCKS for a packed micro batch in one row."""
    if packs_one_row(model):
        bf16 = model.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        want = BLOCKS if one_packed_row else cpu_choice(row_len, bf16)
        if want == "sdpa" and not getattr(model, "_supports_sdpa", True):
            want = "eager"  # soft-capping models (Gemma 2), sinks (gpt-oss): transformers runs them eager only
        if model.config._attn_implementation != want:
            if want != "sdpa":
                register()  # a model loaded as SDPA (fp32 weights) meets bf16 autocast here
            model.set_attn_implementation(want)
