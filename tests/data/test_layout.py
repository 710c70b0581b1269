"""Packing rows (data only): first-fit decreasing, the packed layout, its errors; length grouping."""
import pytest
import torch

from loralab.data.batching import collate, grouped_batches, iterate_batches
from loralab.data.layout import collate_packed, pack_rows, padding_stats, plain_slots
from loralab.data.prompts import Encoded
from loralab.errors import UserError
from tinymodels import random_encoded


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([]) == []
    assert pack_rows([5]) == [[0]]
    # capacity defaults to the longest: 10 | 6+4 | 3+3+2 (first fit, longest first)
    assert pack_rows([3, 10, 6, 4, 3, 2]) == [[1], [2, 3], [0, 4, 5]]
    assert pack_rows([4, 4, 4], capacity=8) == [[0, 1], [2]]
    assert pack_rows([9, 2], capacity=4) == [[0], [1]]  # too long for the capacity: a row of its own
    rows = pack_rows([7, 1, 5, 3, 2, 8, 6], capacity=8)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum([7, 1, 5, 3, 2, 8, 6][i] for i in r) <= 8 for r in rows)


def test_collate_packed_layout():
    a = Encoded(input_ids=[10, 11, 12, 13, 14, 15], labels=[-100, -100, 12, 13, 14, 15])
    b = Encoded(input_ids=[20, 21, 22], labels=[20, 21, 22])  # a label on position 0: masked when packed
    c = Encoded(input_ids=[30, 31], labels=[-100, 31])
    batch = collate_packed([a, b, c], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15], [20, 21, 22, 30, 31, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 12, 13, 14, 15], [-100, 21, 22, -100, 31, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert all(t.dtype == torch.long for t in batch.values())
    plain = collate([a, b, c], pad_id=0)
    # the same real tokens; the same usable labels (position 0 of a row never counts in the loss)
    assert int(batch["attention_mask"].sum()) == int(plain["attention_mask"].sum()) == 11
    assert int((batch["labels"][:, 1:] != -100).sum()) == int((plain["labels"][:, 1:] != -100).sum())
    assert padding_stats([batch])["padding_fraction"] == pytest.approx(1 / 12)
    assert padding_stats([plain])["padding_fraction"] == pytest.approx(7 / 18)
    one = collate_packed([a, b, c], pad_id=0, one_row=True)  # those rows end to end, the padding gone
    for key in ("input_ids", "labels", "position_ids", "attention_mask"):
        assert one[key].tolist() == [batch[key][0].tolist() + batch[key][1, :5].tolist()], key


def test_collate_packed_errors():
    with pytest.raises(UserError, match="empty batch"):
        collate_packed([], pad_id=0)
    with pytest.raises(UserError, match="pad token"):
        collate_packed(random_encoded([3]), pad_id=None)
    with pytest.raises(UserError, match="no unmasked label"):
        collate_packed([Encoded(input_ids=[1, 2], labels=[-100, -100])], pad_id=0)
    with pytest.raises(ValueError, match="differ in length"):
        collate_packed([Encoded(input_ids=[1, 2], labels=[2])], pad_id=0)


def test_grouped_batches_cover_each_example_once_and_cut_padding():
    examples = random_encoded([3 + (k * 37) % 97 for k in range(200)], seed=11)
    batches = list(grouped_batches(examples, 8, seed=4, epoch=0, window=8))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert [len(b) for b in batches].count(8) == 25
    assert batches == list(grouped_batches(examples, 8, seed=4, epoch=0, window=8))
    assert batches != list(grouped_batches(examples, 8, seed=4, epoch=1, window=8))
    grouped = padding_stats([collate([examples[i] for i in b], 0) for b in batches])
    shuffled = padding_stats([collate([examples[i] for i in b], 0)
                              for b in iterate_batches(examples, 8, seed=4, epoch=0)])
    assert grouped["real_tokens"] == shuffled["real_tokens"]
    assert grouped["padding_fraction"] < 0.5 * shuffled["padding_fraction"]
    one = list(grouped_batches(examples, 8, seed=4, epoch=0, window=1))
    assert sorted(i for b in one for i in b) == list(range(200))
    with pytest.raises(UserError, match="train.group_by_length"):
        list(grouped_batches(examples, 8, seed=4, epoch=0, window=0))


def test_shared_prefix_length_leaves_every_sequence_a_token_of_its_own():
    from loralab.data.layout import shared_prefix_length
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical sequences: the last token is each row's
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("seed", range(4))
def test_plain_slots_are_what_the_plain_layouts_compute(seed):
    lengths = torch.randint(3, 40, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    ex = random_encoded(lengths, seed=seed)
    assert plain_slots(ex, packed=True) == collate_packed(ex, pad_id=0)["input_ids"].numel()
    assert plain_slots(ex, packed=False) == collate(ex, pad_id=0)["input_ids"].numel()
    assert plain_slots(ex, packed=True, one_row=True) == collate_packed(ex, 0, one_row=True)["input_ids"].numel()
