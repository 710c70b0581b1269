import pytest
import torch

from loralab.data.batching import collate, iterate_batches, left_pad, split_validation
from loralab.data.formats import Example
from loralab.data.prompts import Encoded, encode_all
from loralab.errors import UserError
from tinymodels import tiny_llama


def test_split_validation_deterministic_disjoint_and_sized():
    data = list(range(100))
    train, val = split_validation(data, 0.1, seed=4)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == data and train == sorted(train)  # original order kept
    assert split_validation(data, 0.1, seed=4) == (train, val)
    assert split_validation(data, 0.1, seed=5)[1] != val
    assert split_validation(data, 0.0, seed=4) == (data, [])
    assert split_validation([1, 2], 0.01, seed=0)[1] != []  # a requested split is never empty
    assert split_validation([1], 0.5, seed=0) == ([1], [])  # but train keeps its only example
    with pytest.raises(UserError, match="data.val_fraction"):
        split_validation(data, 1.0, seed=0)


def test_iterate_batches_deterministic_per_seed_and_epoch():
    data = list(range(10))
    e0 = list(iterate_batches(data, 3, seed=1, epoch=0))
    assert e0 == list(iterate_batches(data, 3, seed=1, epoch=0))
    assert [len(b) for b in e0] == [3, 3, 3, 1]
    assert sorted(i for b in e0 for i in b) == data
    assert e0 != list(iterate_batches(data, 3, seed=1, epoch=1))
    assert e0 != list(iterate_batches(data, 3, seed=2, epoch=0))
    assert [len(b) for b in iterate_batches(data, 3, seed=1, epoch=0, drop_last=True)] == [3, 3, 3]
    assert list(iterate_batches(data, 4, seed=1, epoch=0, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(UserError, match="train.batch_size"):
        list(iterate_batches(data, 0, seed=1, epoch=0))


def test_collate_right_pads():
    a = Encoded(input_ids=[5, 6, 7], labels=[-100, 6, 7])
    b = Encoded(input_ids=[8, 9], labels=[-100, 9])
    batch = collate([a, b], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_refuses_a_batch_without_labels():
    masked = Encoded(input_ids=[5, 6], labels=[-100, -100])
    first_only = Encoded(input_ids=[5, 6], labels=[5, -100])  # position 0 is never predicted
    for batch in ([masked], [masked, first_only]):
        with pytest.raises(UserError, match="no unmasked label"):
            collate(batch, pad_id=0)
    assert collate([masked, Encoded(input_ids=[1, 2], labels=[-100, 2])], 0)["labels"].tolist()[1] == [-100, 2]


def test_left_pad_for_generation():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encoded_examples_feed_a_tiny_model(tiny_tokenizer):
    # End to end: tiny tokenizer ids fit the tiny model's vocabulary, and the loss covers exactly
    # the labelled tokens.
    data = [Example(prompt="Q: 1+2?\nA:", response=" 3"),
            Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])]
    enc, stats = encode_all(data, tiny_tokenizer)
    assert stats["n_kept"] == 2
    batch = collate(enc, tiny_tokenizer.pad_token_id)
    assert int(batch["input_ids"].max()) < 128
    with torch.no_grad():
        out = tiny_llama()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"])
    assert torch.isfinite(out.loss)
    assert int((batch["labels"][:, 1:] != -100).sum()) == stats["n_label_tokens"] == 3 + 3
