"""Packing: lay the examples of one micro batch end to end in fewer rows (data only, no model).

Instruction data mixes very short and long examples (a 20-token arithmetic question next to a
300-token chat answer); padded to the longest, most of a batch is padding that the model still
computes. `collate_packed` (config `train.packing`) takes the examples of ONE micro batch, the same
ones `batching.collate` would get, and lays them end to end in as few rows as possible (first-fit
decreasing into rows as wide as the longest example), a pure function of the data. Position ids
restart at 0 for every example; with block-diagonal causal attention (each token sees only earlier
tokens of its own example) every example's logits, loss and gradient are those of the unpacked
batch: the same computation with less padding. The first label of each example is masked, as the
loss never predicts position 0 of an unpacked row. How the model is fed such a batch, and the check
that it honours restarting positions, is the model's half: loralab.train.packing.
"""
from __future__ import annotations

from collections.abc import Sequence

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


def padding_stats(batches: Sequence[dict]) -> dict:
    """Real vs computed token positions over collated batches: how much of the work is padding."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"real_tokens": real, "slots": slots, "padding_fraction": 1 - real / slots if slots else 0.0}
