import dataclasses

import pytest
import torch

from loralab.config import TrainConfig
from loralab.data.batching import collate
from loralab.data.layout import collate_packed, collate_shared, input_tokens, label_free_prefix, shared_slots
from loralab.data.prompts import IGNORE_INDEX, Encoded
from loralab.model.attention import visible
from loralab.train.loop import collate_micro_batch, train
from loralab.train.loss import loss_sum
from tinymodels import random_encoded, tiny_llama, with_lora


def _prefixed(lengths, prefix_len=9, seed=0):
    """Examples that all start with the same prefix_len tokens (a system prompt), prompt-masked."""
    prefix = torch.randint(3, 128, (prefix_len,), generator=torch.Generator().manual_seed(seed + 100)).tolist()
    return [Encoded(prefix + e.input_ids, [IGNORE_INDEX] * prefix_len + e.labels)
            for e in random_encoded(lengths, seed=seed)]


def _lora_model(attn="eager", dtype=torch.float32):
    return with_lora(tiny_llama(seed=2, attn_implementation=attn).to(dtype))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    s, n = loss_sum(model, batch)
    (s / n).backward()
    return float(s.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_label_free_prefix_stops_before_the_first_label():
    examples = _prefixed([9, 12, 6], prefix_len=7)
    assert label_free_prefix(examples) == 7
    # a label right after 5 shared tokens: position 4 predicts it, so only 4 tokens may be shared
    early = Encoded(examples[0].input_ids, [IGNORE_INDEX] * 5 + examples[0].input_ids[5:])
    assert label_free_prefix([early] + examples[1:]) == 4
    assert label_free_prefix(random_encoded([9, 12], seed=1)) == 0  # nothing shared


def test_collate_shared_holds_the_prefix_once_per_row_and_counts_every_token():
    examples = _prefixed([9, 3, 12, 5, 4, 6], prefix_len=6)
    plain = collate(examples, pad_id=0)
    shared = collate_shared(examples, pad_id=0, k=6, capacity=24)
    rows = shared["input_ids"].shape[0]
    assert rows < len(examples) and int(shared["shared_prefix"]) == 6
    assert all(r[:6] == examples[0].input_ids[:6] for r in shared["input_ids"].tolist())
    assert shared_slots(examples, 6) <= shared["input_ids"].numel()
    assert input_tokens(shared) == input_tokens(plain) == sum(len(e.input_ids) for e in examples)
    assert int(shared["attention_mask"].sum()) == sum(len(e.input_ids) - 6 for e in examples) + 6 * rows
    # each example's own tokens start at position 6, and its labels are the plain batch's
    starts = (shared["position_ids"] == 6) & shared["attention_mask"].bool()
    assert int(starts.sum()) == len(examples)
    assert sorted(shared["labels"][shared["labels"] != IGNORE_INDEX].tolist()) == \
        sorted(plain["labels"][plain["labels"] != IGNORE_INDEX].tolist())


def test_visible_mask_keeps_examples_apart():
    # one row: a 2-token prefix, examples of 2 and 3 own tokens, then one pad
    position = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    see = visible(position, mask, k=2)[0].int()
    assert see.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1, 1],  # the pad: its row's last example and itself, never an empty row
    ]


@pytest.mark.parametrize("attn", ["eager", "sdpa", "eager_recompute"])
@pytest.mark.parametrize("capacity", [None, 40])
def test_shared_prefix_loss_and_gradients_equal_the_plain_batch(attn, capacity):
    from loralab.model.attention import register

    register()
    model = _lora_model(attn)
    examples = _prefixed([14, 5, 9, 3, 12, 4, 8], prefix_len=9, seed=3)
    plain = collate(examples, pad_id=0)
    shared = collate_shared(examples, pad_id=0, k=9, capacity=capacity)
    assert shared["input_ids"].numel() < plain["input_ids"].numel()
    s0, n0, g0 = _loss_and_grads(model, plain)
    s1, n1, g1 = _loss_and_grads(model, shared)
    assert n0 == n1
    assert s1 == pytest.approx(s0, rel=1e-5)
    for k in g0:  # every LoRA factor: the prefix's gradient is the sum over the examples reading it
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_shared_prefix_on_the_full_logits_fallback_and_in_bf16():
    examples = _prefixed([11, 4, 7], prefix_len=8, seed=4)
    model = _lora_model(dtype=torch.bfloat16)
    model._loralab_selected_head = False  # as if the head check had failed: the model's own logits
    s0, n0, g0 = _loss_and_grads(model, collate(examples, pad_id=0))
    s1, n1, g1 = _loss_and_grads(model, collate_shared(examples, pad_id=0, k=8))
    assert n0 == n1 and s1 == pytest.approx(s0, rel=2e-2)
    for k in g0:
        assert float((g1[k] - g0[k]).float().norm()) <= 5e-2 * float(g0[k].float().norm()) + 1e-6


def test_the_shared_prefix_converter_declines_what_would_leak_between_examples():
    from transformers import LlamaForCausalLM

    from loralab.model.convert import Target, convert

    assert "shared_prefix" in convert(tiny_llama(seed=4), "auto", Target()).applied
    flash = tiny_llama(seed=4)
    flash.config._attn_implementation = "flash_attention_2"  # takes no 4D mask: refused before running
    assert convert(flash, ["shared_prefix"], Target()).declined == {
        "shared_prefix": "flash_attention_2 attention takes no 4D mask"}

    class IgnoresMask(LlamaForCausalLM):  # attends over the whole row: examples would see each other
        def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kw):
            return super().forward(input_ids=input_ids, position_ids=position_ids, **kw)

    report = convert(IgnoresMask(tiny_llama(seed=4).config).eval(), ["shared_prefix"], Target())
    assert report.declined["shared_prefix"].startswith("probe: shared prefix")


def test_the_loop_shares_a_prefix_only_where_it_computes_fewer_positions():
    cfg = TrainConfig(batch_size=8)
    examples = _prefixed([6] * 8, prefix_len=10)
    assert "shared_prefix" in collate_micro_batch(examples, 0, cfg)  # 2 rows of 10 + 4 x 6 vs 8 of 16
    assert "shared_prefix" not in collate_micro_batch(examples[:1], 0, cfg)  # one example: nothing to spare
    long_own = _prefixed([200, 190], prefix_len=3)  # one example per row either way
    assert "shared_prefix" not in collate_micro_batch(long_own, 0, cfg)
    assert "shared_prefix" not in collate_micro_batch(examples, 0, dataclasses.replace(cfg, shared_prefix=False))
    assert collate_micro_batch(examples, 0, dataclasses.replace(cfg, shared_prefix=False, packing=False)).keys() \
        == collate(examples, 0).keys()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_with_a_shared_prefix_matches_training_without(checkpointing, monkeypatch):
    examples = _prefixed([6, 9, 4, 7, 5, 8, 6, 7] * 2, prefix_len=12, seed=6)
    cfg = TrainConfig(batch_size=8, max_steps=3, lr=1e-2, warmup_steps=0, progress=False, log_every=1,
                      gradient_checkpointing=checkpointing)
    assert "shared_prefix" in collate_micro_batch(examples[:8], 0, cfg)
    losses = []
    for share in (True, False):
        model = _lora_model("sdpa")
        if share:  # validation takes the loop's layout, not mean_loss's padded default
            monkeypatch.setattr("loralab.train.loss.collate", lambda *a: pytest.fail("padded validation"))
        else:
            monkeypatch.undo()
        result = train(model, examples, dataclasses.replace(cfg, shared_prefix=share), pad_id=0,
                       val_data=examples[:8])  # validation in the same layout as training
        losses.append(([h["loss"] for h in result.history], result.train_tokens, result.final_val_loss))
    (with_prefix, tokens, val), (without, tokens0, val0) = losses
    assert tokens == tokens0  # tokens/s counts the data's tokens either way
    assert with_prefix == pytest.approx(without, rel=1e-4)
    assert val == pytest.approx(val0, rel=1e-4)
    assert with_prefix[-1] < with_prefix[0]  # and it trains


def test_collate_packed_still_used_without_a_prefix():
    examples = random_encoded([9, 4, 6, 3, 8, 5, 7, 2], seed=2)
    cfg = TrainConfig(batch_size=8)
    assert collate_micro_batch(examples, 0, cfg).keys() == collate_packed(examples, 0).keys()
