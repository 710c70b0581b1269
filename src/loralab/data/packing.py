"""Less padding: pack a micro batch into fewer rows, or group examples of similar length.

Instruction data mixes very short and long examples (a 20-token arithmetic question next to a
300-token chat answer); padded to the longest, most of a batch is padding that the model still
computes. Two levers, both pure functions of the data (a resumed run sees the same batches):

  - `collate_packed` (config `data.packing`): the examples of ONE micro batch, the same ones
    `collate` would get, laid end to end in as few rows as possible (first-fit decreasing into rows
    as wide as the longest example). Position ids restart at 0 for every example, and attention is
    block-diagonal causal (each token sees only earlier tokens of its own example), so every
    example's logits, loss and gradient are those of the unpacked batch: the training run is the
    same computation with less padding. The first label of each example is masked, as the loss
    never predicts position 0 of an unpacked row.
  - `grouped_batches` (config `data.group_by_length`): within a window of shuffled batches, sort by
    length before cutting batches, then shuffle the batches. Every example is still seen once per
    epoch, but which examples share a step changes (a mild change of gradient noise).

How the model sees a packed batch: `packed_inputs` turns it into `input_ids` + `position_ids` with
`attention_mask=None`; transformers (Llama, Qwen2, Mistral, ... via `masking_utils`) detects the
restarting position ids and builds the block-diagonal causal mask for eager and SDPA attention.
`loss_sum` here wraps `loralab.loss.loss_sum` so the rest of the loss (labelled positions only,
chunked head) is unchanged.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from .prompts import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity (default: the longest length), by
    first-fit decreasing. A length above capacity gets a row of its own. Rows keep a stable,
    deterministic order: longest first; ties by index."""
    if not lengths:
        return []
    cap = max(lengths) if capacity is None else capacity
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(cap - n)
    return rows


def collate_packed(encoded_list: Sequence, pad_id: int, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Like `batching.collate`, but several examples share a row. Returns int64 tensors:
    input_ids, labels (IGNORE_INDEX on pads and on each example's first token), attention_mask
    (1 on real tokens, 0 on the padding at a row's end: it counts tokens; the model gets
    position_ids instead, see `packed_inputs`), position_ids (0, 1, ... per example; the padding
    at a row's end is one more segment, so no real token attends to it)."""
    if not encoded_list:
        raise UserError("empty batch: no examples to train on")
    if pad_id is None:
        raise UserError("the tokenizer has no pad token and no eos token to pad with")
    lengths = [len(e.input_ids) for e in encoded_list]
    for e, k in zip(encoded_list, lengths):
        if len(e.labels) != k:
            raise ValueError(f"labels ({len(e.labels)}) and input_ids ({k}) differ in length")
        if k == 0:
            raise ValueError("an example has no tokens")
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    position = torch.zeros((n, width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e, k = encoded_list[i], lengths[i]
            input_ids[r, at:at + k] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[r, at + 1:at + k] = torch.tensor(e.labels[1:], dtype=torch.long)
            position[r, at:at + k] = torch.arange(k)
            at += k
        attention[r, :at] = 1
        position[r, at:] = torch.arange(width - at)
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise UserError("a batch has no unmasked label: every response in it is empty or truncated "
                        "away (check the data and data.max_seq_len)")
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": position}


def packed_inputs(batch: dict) -> dict:
    """Keyword arguments for the model: a packed batch passes position_ids and no 2D mask (the
    model derives the block-diagonal causal mask); a plain batch passes its attention_mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _body(model):
    return getattr(model, getattr(model, "base_model_prefix", "model"), None) or model


@contextmanager
def _positions_into(module: torch.nn.Module, position_ids: torch.Tensor):
    """While active, every call of `module` gets these position_ids and no 2D attention mask."""
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


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """`loralab.loss.loss_sum` for plain and packed batches alike (the drop-in for the loop)."""
    from .. import loss as loss_lib

    if "position_ids" not in batch:
        return loss_lib.loss_sum(model, batch)
    with _positions_into(_body(model), batch["position_ids"]):
        return loss_lib.loss_sum(model, batch)


@torch.no_grad()
def packing_supported(model, pad_id: int, vocab_size: int | None = None) -> bool:
    """One-time check that the model honours packed position ids (restarting positions give a
    block-diagonal causal mask): two short random examples packed in one row must give the logits
    each gives alone. False for models whose attention ignores them; the loop then falls back to
    padded batches (with a warning), since packing would let examples attend to each other."""
    from .prompts import Encoded

    was_training = model.training
    model.eval()
    try:
        vocab = vocab_size or model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        examples = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 5)]
        batch = collate_packed([Encoded(e, e) for e in examples], pad_id, capacity=12)  # one row
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


def grouped_batches(encoded: Sequence, batch_size: int, *, seed: int, epoch: int,
                    window: int = 16) -> Iterator[list[int]]:
    """Index lists like `batching.iterate_batches`, with similar lengths together: the epoch's
    shuffled order is cut into windows of `window` batches; each window is sorted by length, cut
    into batches, and those batches are shuffled (so long and short steps stay interleaved).
    Each example appears exactly once per epoch; order is a pure function of (seed, epoch)."""
    if batch_size <= 0:
        raise UserError(f"config key 'train.batch_size' must be > 0, got {batch_size}")
    if window <= 0:
        raise UserError(f"config key 'data.group_window' must be > 0, got {window}")
    order = list(range(len(encoded)))
    rng = random.Random(f"loralab:grouped:{seed}:{epoch}")
    rng.shuffle(order)
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: (len(encoded[i].input_ids), i))
        batches = [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def padding_stats(batches: Sequence[dict]) -> dict:
    """Real vs computed token positions over collated batches: how much of the work is padding."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"real_tokens": real, "slots": slots, "padding_fraction": 1 - real / slots if slots else 0.0}
