"""Validation split, deterministic batch order (plain or grouped by length), and padding into tensors.

Order is a pure function of (seed, epoch): a resumed run that skips the batches it already did
sees exactly the batches an uninterrupted run would have seen. `micro_batch_indices` is the one
stream of micro batches the training loop (and the benchmarks' baseline) draws from.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from ..errors import UserError
from .prompts import IGNORE_INDEX


def split_validation(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val), each in the original order. With val_fraction > 0 and at least two examples,
    val gets at least one and train keeps at least one."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"config key 'data.val_fraction' must be in [0, 1), got {val_fraction!r}")
    n = len(examples)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    order = list(range(n))
    random.Random(f"loralab:val:{seed}").shuffle(order)
    val_idx = set(order[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def iterate_batches(encoded: Sequence, batch_size: int, *, seed: int, epoch: int,
                    shuffle: bool = True, drop_last: bool = False) -> Iterator[list[int]]:
    """Index lists, one per micro batch, for one epoch. Callers collate `[encoded[i] for i in idx]`."""
    if batch_size <= 0:
        raise UserError(f"config key 'train.batch_size' must be > 0, got {batch_size}")
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(f"loralab:batches:{seed}:{epoch}").shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield idx


def grouped_batches(encoded: Sequence, batch_size: int, *, seed: int, epoch: int,
                    window: int = 16) -> Iterator[list[int]]:
    """Index lists like `iterate_batches`, with similar lengths together (config
    `train.group_by_length`): the epoch's shuffled order is cut into windows of `window` batches;
    each window is sorted by length, cut into batches, and those batches are shuffled (so long and
    short steps stay interleaved). Each example appears exactly once per epoch, but which examples
    share a step changes (a mild change of gradient noise); order is a pure function of (seed, epoch)."""
    if batch_size <= 0:
        raise UserError(f"config key 'train.batch_size' must be > 0, got {batch_size}")
    if window <= 0:
        raise UserError(f"config key 'train.group_by_length' must be > 0 to group, got {window}")
    order = list(range(len(encoded)))
    rng = random.Random(f"loralab:grouped:{seed}:{epoch}")
    rng.shuffle(order)
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: (len(encoded[i].input_ids), i))
        batches = [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def micro_batch_indices(encoded: Sequence, batch_size: int, *, seed: int, group_window: int = 0,
                        skip: int = 0) -> Iterator[list[int]]:
    """The endless stream of micro batches (index lists) a run trains on: epoch after epoch, each
    shuffled by (seed, epoch), grouped by length when group_window > 0. The first `skip` are passed
    over (resuming mid-run)."""
    epoch = 0
    while True:
        if group_window:
            order = grouped_batches(encoded, batch_size, seed=seed, epoch=epoch, window=group_window)
        else:
            order = iterate_batches(encoded, batch_size, seed=seed, epoch=epoch)
        for idx in order:
            if skip:
                skip -= 1
                continue
            yield idx
        epoch += 1


def rank_share(items: Sequence, rank: int, world: int) -> tuple[list, float]:
    """One rank's share of a global batch (every world-th item; strided, so length-sorted batches
    split evenly) and its weight. A rank whose share is empty (the uneven end of an epoch) gets the
    batch's first item with weight 0: every rank still runs the same forwards and backwards, which
    sharded weights (gathered in lockstep) need, and the item counts for nothing."""
    share = list(items[rank::world])
    return (share, 1.0) if share else (list(items[:1]), 0.0)


def collate(encoded_list: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (IGNORE_INDEX on pads) and attention_mask, as int64.

    A batch with no usable label (labels are shifted by one in the loss, so position 0 does not
    count) is an error: its loss would be a silent 0 that trains nothing.
    """
    if not encoded_list:
        raise UserError("empty batch: no examples to train on")
    if pad_id is None:
        raise UserError("the tokenizer has no pad token and no eos token to pad with")
    width = max(len(e.input_ids) for e in encoded_list)
    n = len(encoded_list)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, e in enumerate(encoded_list):
        k = len(e.input_ids)
        if len(e.labels) != k:
            raise ValueError(f"labels ({len(e.labels)}) and input_ids ({k}) differ in length")
        input_ids[row, :k] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :k] = torch.tensor(e.labels, dtype=torch.long)
        attention[row, :k] = 1
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise UserError("a batch has no unmasked label: every response in it is empty or truncated "
                        "away (check the data and data.max_seq_len)")
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) left-padded, for batched generation (new tokens go on the right)."""
    if not ids:
        raise UserError("no prompts to generate from")
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        if len(x):
            input_ids[row, width - len(x):] = torch.tensor(list(x), dtype=torch.long)
            attention[row, width - len(x):] = 1
    return input_ids, attention
