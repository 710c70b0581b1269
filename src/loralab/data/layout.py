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
that it honours restarting positions, is the model's half: loralab.model.packing.

A shared prefix (`collate_shared`, config `train.shared_prefix`): when every example of a micro
batch starts with the same tokens that no label needs (a chat template's system prompt, a task's
"Question: What is"), each row holds them once, followed by several examples' own tokens (positions
from k). The model's mask lets each example see the prefix and itself (loralab.model.shared_prefix), so
every example's logits are again those of the plain batch, computed over fewer tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from .prompts import IGNORE_INDEX, Encoded

# Rows of a shared-prefix micro batch hold at least this many tokens (more when an example is
# longer): the prefix is computed once per row, so short examples must share rows to spare it, and
# wider rows cost attention over the whole row. 64 was the fastest width for the demo's micro batch in
# bf16 and close to it in fp32 (docs/performance.md, "Measurements behind the code": data/layout.py).
SHARED_ROW_TOKENS = 64


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


def collate_packed(encoded_list: Sequence, pad_id: int, capacity: int | None = None,
                   one_row: bool = False) -> dict[str, torch.Tensor]:
    """Like `batching.collate`, but several examples share a row. Returns int64 tensors:
    input_ids, labels (IGNORE_INDEX on pads and on each example's first token), attention_mask
    (1 on real tokens, 0 on the padding at a row's end: it counts tokens; the model gets
    position_ids instead, see `packed_inputs`), position_ids (0, 1, ... per example; the padding
    at a row's end is one more segment, so no real token attends to it). one_row: those rows end
    to end in a single row, without padding (for an attention that computes them as blocks:
    model.attention.BLOCKS)."""
    rows = pack_rows(_checked_lengths(encoded_list, pad_id), capacity)
    return _lay_out(encoded_list, pad_id, [], [[i for row in rows for i in row]] if one_row else rows)


def _checked_lengths(encoded_list: Sequence, pad_id: int) -> list[int]:
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
    return lengths


def _lay_out(examples: Sequence, pad_id: int, prefix: list[int], rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Rows of `prefix` followed by the examples of each row end to end: positions 0.. on the
    prefix, each example's counting on from there, its first label masked (nothing in the row
    predicts it), a row's padding one more segment restarting at 0. Int64 tensors."""
    k = len(prefix)
    width = max(k + sum(len(examples[i].input_ids) for i in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), int(pad_id), dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
    for r, row in enumerate(rows):
        batch["input_ids"][r, :k] = torch.tensor(prefix, dtype=torch.long)
        batch["position_ids"][r, :k] = torch.arange(k)
        at = k
        for i in row:
            e, n = examples[i], len(examples[i].input_ids)
            batch["input_ids"][r, at:at + n] = torch.tensor(e.input_ids, dtype=torch.long)
            batch["labels"][r, at + 1:at + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            batch["position_ids"][r, at:at + n] = torch.arange(k, k + n)
            at += n
        batch["attention_mask"][r, :at] = 1
        batch["position_ids"][r, at:] = torch.arange(width - at)
    _check_labels(batch["labels"])
    return batch


def _check_labels(labels: torch.Tensor) -> None:
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise UserError("a batch has no unmasked label: every response in it is empty or truncated "
                        "away (check the data and data.max_seq_len)")


def padding_stats(batches: Sequence[dict]) -> dict:
    """Real vs computed token positions over collated batches: how much of the work is padding."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"real_tokens": real, "slots": slots, "padding_fraction": 1 - real / slots if slots else 0.0}


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """How many first tokens every sequence shares, leaving each at least one token of its own."""
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for k in range(max(n, 0)):
        if any(x[k] != first[k] for x in ids):
            return k
    return max(n, 0)


def label_free_prefix(encoded_list: Sequence) -> int:
    """The shared first tokens of a micro batch's examples whose outputs no label needs: position p
    predicts label p + 1, so the prefix ends before the position that predicts the first label."""
    k = shared_prefix_length([e.input_ids for e in encoded_list])
    for e in encoded_list:
        first = next((j for j in range(1, len(e.labels)) if e.labels[j] != IGNORE_INDEX), len(e.labels))
        k = min(k, first - 1)
    return max(k, 0)


def collate_shared(encoded_list: Sequence, pad_id: int, k: int, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Rows that each start with the examples' shared first k tokens, followed by as many examples'
    own tokens as fit (first-fit decreasing into rows of `capacity` tokens, default the longest
    example or SHARED_ROW_TOKENS, whichever is more). position_ids: 0..k-1 on the prefix, from k on
    each example's own tokens (a row's padding restarts at 0); `shared_prefix`: k, so the model
    builds the mask (each example sees the prefix and itself). k must not exceed
    label_free_prefix(encoded_list)."""
    _checked_lengths(encoded_list, pad_id)
    own = [Encoded(e.input_ids[k:], e.labels[k:]) for e in encoded_list]
    rows, _ = _shared_rows([len(e.input_ids) for e in own], k, capacity)
    batch = _lay_out(own, pad_id, list(encoded_list[0].input_ids[:k]), rows)
    batch["shared_prefix"] = torch.tensor([k], dtype=torch.long)
    return batch


def _shared_rows(own: list[int], k: int, capacity: int | None = None) -> tuple[list[list[int]], int]:
    """collate_shared's rows (indices into `own`, the examples' own lengths) and their width."""
    cap = max(max(own) + k, SHARED_ROW_TOKENS) if capacity is None else capacity
    rows = pack_rows(own, cap - k)
    return rows, max(k + sum(own[i] for i in row) for row in rows)


def plain_slots(encoded_list: Sequence, packed: bool, one_row: bool = False) -> int:
    """Token positions collate_packed's rows (packed; one_row: its single row) or batching.collate's
    padded rows would compute."""
    lengths = [len(e.input_ids) for e in encoded_list]
    if packed and one_row:
        return sum(lengths)
    if not packed:
        return len(lengths) * max(lengths)
    rows = pack_rows(lengths)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def shared_slots(encoded_list: Sequence, k: int) -> int:
    """Token positions collate_shared's rows would compute (rows x width), to compare layouts."""
    rows, width = _shared_rows([len(e.input_ids) - k for e in encoded_list], k)
    return len(rows) * width


def input_tokens(batch: dict) -> int:
    """The examples' tokens a collated micro batch holds, a shared prefix counted once per example
    (as the data has it) although each row holds it once."""
    real = int(batch["attention_mask"].sum())
    if "shared_prefix" not in batch:
        return real
    k = int(batch["shared_prefix"])
    starts = (batch["position_ids"] == k) & batch["attention_mask"].bool()  # each example's first own token
    return real + k * (int(starts.sum()) - batch["input_ids"].shape[0])
