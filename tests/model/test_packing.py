import pytest
import torch

from loralab.data.batching import collate
from loralab.data.layout import collate_packed, pack_rows
from loralab.model.packing import packed_inputs
from loralab.train.loss import loss_sum
from loralab.train.loss import loss_sum as packed_loss_sum
from tinymodels import random_encoded, tiny_llama, with_lora


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked_logits(attn):
    model = tiny_llama(seed=1, attn_implementation=attn).float()
    examples = random_encoded([17, 5, 9, 3, 12, 4, 8], seed=3)
    batch = collate_packed(examples, pad_id=0)
    rows = pack_rows([len(e.input_ids) for e in examples])  # the layout collate_packed used
    assert len(rows) == batch["input_ids"].shape[0] < len(examples)  # it did pack
    with torch.no_grad():
        packed = model(**packed_inputs(batch), use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for k in row:
                ids = examples[k].input_ids
                assert batch["input_ids"][r, at:at + len(ids)].tolist() == ids
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, at:at + len(ids)], alone, rtol=1e-5, atol=1e-5)
                at += len(ids)


def _lora_model(attn="eager"):
    return with_lora(tiny_llama(seed=2, attn_implementation=attn).float())


def _loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    s, n = fn(model, batch)
    (s / n).backward()
    return float(s.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_padded(attn):
    model = _lora_model(attn)
    examples = random_encoded([40, 6, 11, 25, 3, 7, 30, 9], seed=5)
    plain = collate(examples, pad_id=0)
    packed = collate_packed(examples, pad_id=0)
    assert packed["input_ids"].numel() < plain["input_ids"].numel()
    s0, n0, g0 = _loss_and_grads(model, plain, loss_sum)
    s1, n1, g1 = _loss_and_grads(model, packed, packed_loss_sum)
    assert n0 == n1
    assert s1 == pytest.approx(s0, rel=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
    # a plain batch through the packed drop-in is the plain loss; no hook is left behind
    s2, n2, _ = _loss_and_grads(model, plain, packed_loss_sum)
    assert (s2, n2) == pytest.approx((s0, n0))
    assert not model.model._forward_pre_hooks


def test_the_first_packed_batch_runs_the_one_time_path_check_on_a_prefix():
    # The check compares a prefix of one row (model.head.CHECK_POSITIONS); the packed positions must be
    # cut to that prefix too, or rotary embeddings see a length mismatch.
    model = _lora_model()
    examples = random_encoded([40, 30, 25, 6], seed=3)
    packed = collate_packed(examples, pad_id=0)
    assert packed["input_ids"].shape[1] > 16
    s1, n1, _ = _loss_and_grads(model, packed, packed_loss_sum)  # fresh model: the check runs here
    s0, n0, _ = _loss_and_grads(model, collate(examples, pad_id=0), loss_sum)
    assert n1 == n0 and s1 == pytest.approx(s0, rel=1e-5)


def test_packed_loss_on_the_full_logits_fallback():
    """loss.loss_sum falls back to the model's own logits for heads it cannot split: packed too."""
    examples = random_encoded([12, 5, 8, 3], seed=7)
    results = []
    for batch in (collate(examples, pad_id=0), collate_packed(examples, pad_id=0)):
        model = _lora_model()
        model._loralab_selected_head = False  # as if the one-time head check had failed
        results.append(_loss_and_grads(model, batch, packed_loss_sum))
    (s0, n0, g0), (s1, n1, g1) = results
    assert n0 == n1 and s1 == pytest.approx(s0, rel=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_without_position_ids_packing_would_leak_acrossrandom_encoded():
    """The check above is meaningful: a plain all-ones mask over a packed row changes the logits."""
    model = tiny_llama(seed=1).float()
    examples = random_encoded([6, 5], seed=9)
    batch = collate_packed(examples, pad_id=0, capacity=11)
    assert batch["input_ids"].shape == (1, 11)
    with torch.no_grad():
        good = model(**packed_inputs(batch), use_cache=False).logits[0, 6:]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 6:]
        alone = model(input_ids=torch.tensor([examples[1].input_ids]), use_cache=False).logits[0]
    torch.testing.assert_close(good, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_the_packed_rows_converter_declines_a_model_class_that_ignores_packed_positions():
    from transformers import LlamaForCausalLM

    from loralab.model.convert import Target, convert

    class IgnoresPositions(LlamaForCausalLM):  # attention over the whole row, positions dropped
        def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kw):
            return super().forward(input_ids=input_ids, **kw)

    assert "packed_rows" in convert(tiny_llama(seed=4), "auto", Target()).applied
    leaky = IgnoresPositions(tiny_llama(seed=4).config).eval()
    report = convert(leaky, "auto", Target())
    assert "packed_rows" not in report.applied and report.declined["packed_rows"].startswith("probe: packed rows")
