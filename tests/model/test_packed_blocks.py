"""A packed micro batch in one row, its attention computed as blocks of whole examples (model.attention.BLOCKS)."""
import pytest
import torch

from loralab.data.batching import collate
from loralab.data.layout import collate_packed, pack_rows
from loralab.model import attention as A
from loralab.model.packing import packed_inputs
from loralab.train.loss import loss_sum
from tinymodels import load_converted, random_encoded, saved_bytes, with_lora

LENGTHS = [17, 5, 9, 3, 12, 4, 8, 6, 15]


def _auto_lora_model(folder, dtype, attention="auto"):
    return with_lora(load_converted(folder, dtype, attn_implementation=attention), seed=0)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    s, n = loss_sum(model, batch)
    s.backward()
    return float(s.detach()), n, {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,max_row,inner", [(torch.float32, 16, "sdpa"), (torch.bfloat16, 32, A.RECOMPUTE),
                                                 (torch.bfloat16, 8, "sdpa")])
def test_one_packed_row_gives_the_padded_batchs_loss_and_gradients(tiny_folder, monkeypatch, dtype, max_row, inner):
    monkeypatch.setattr(A, "eager_max_row", lambda: max_row)
    calls = []
    for name in ("_grouped_recompute", "_sdpa_blocks"):
        real = getattr(A, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args[1].shape[0]))  # which inner ran, on how many rows (blocks)
            return _real(*args, **kwargs)
        monkeypatch.setattr(A, name, spy)
    model = _auto_lora_model(tiny_folder, dtype)
    examples = random_encoded(LENGTHS, seed=5, vocab=60)
    one_row = collate_packed(examples, pad_id=0, one_row=True)
    assert one_row["input_ids"].shape == (1, sum(LENGTHS))  # no padding at all
    s0, n0, g0 = _loss_and_grads(model, collate(examples, pad_id=0))
    calls.clear()
    s1, n1, g1 = _loss_and_grads(model, one_row)
    assert model.config._attn_implementation == A.BLOCKS
    blocks = len(pack_rows(LENGTHS))
    want = "_grouped_recompute" if inner == A.RECOMPUTE else "_sdpa_blocks"
    assert calls and all(c == (want, blocks) for c in calls), calls
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert n1 == n0 and s1 == pytest.approx(s0, rel=tol)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=tol, atol=tol * g0[k].abs().max().item())


def test_blocks_are_the_rows_first_fit_decreasing_laid_out():
    lengths = [4, 3, 5, 2, 1]
    batch = collate_packed(random_encoded(lengths, seed=1), pad_id=0, one_row=True)
    blocks = A._Blocks.of(batch["position_ids"][0])
    rows = pack_rows(lengths)
    assert (blocks.count, blocks.width) == (len(rows), max(lengths))
    positions = torch.arange(sum(lengths))
    laid = positions.index_select(0, blocks.gather).view(blocks.count, blocks.width)
    real = torch.zeros(blocks.count * blocks.width, dtype=torch.bool)
    real[blocks.scatter] = True
    for b, row in enumerate(rows):  # each block holds the tokens of one row's examples, in place
        assert int(real.view(blocks.count, -1)[b].sum()) == sum(lengths[i] for i in row)
    assert torch.equal(laid.flatten().index_select(0, blocks.scatter), positions)  # and they go back in place
    see = blocks.see[0]  # the first block: the 5-token example, causal
    assert torch.equal(see[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())


def test_blocks_hand_anything_but_one_packed_row_to_sdpa(tiny_folder):
    model = load_converted(tiny_folder, torch.float32, attn_implementation="auto").eval()
    sdpa = load_converted(tiny_folder, torch.float32, attn_implementation="sdpa").eval()
    A.attention_for_rows(model, 0, one_packed_row=True)
    assert model.config._attn_implementation == A.BLOCKS
    examples = random_encoded(LENGTHS, seed=2, vocab=60)
    with torch.no_grad():
        for batch in (collate_packed(examples, pad_id=0), collate(examples, pad_id=0)):  # several rows
            inputs = packed_inputs(batch)
            torch.testing.assert_close(model(**inputs).logits, sdpa(**inputs).logits)
        ids = torch.tensor([examples[0].input_ids])  # generation: a cache, one new token at a time
        torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False),
                                   sdpa.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_a_cpu_auto_model_on_one_row_matches_training_on_rows(tiny_folder, monkeypatch, checkpointing):
    from loralab.config import TrainConfig
    from loralab.train import loop

    examples = random_encoded(LENGTHS * 2, seed=7, vocab=60)
    cfg = TrainConfig(batch_size=9, max_steps=2, lr=1e-2, warmup_steps=0, progress=False, log_every=1,
                      shared_prefix=False, gradient_checkpointing=checkpointing)
    layouts, collate_one = [], loop.collate_micro_batch
    monkeypatch.setattr(loop, "collate_micro_batch", lambda *a, **k: layouts.append(a[3]) or collate_one(*a, **k))
    losses = {}
    for attention in ("auto", "sdpa"):  # a fixed choice keeps the rows
        model = _auto_lora_model(tiny_folder, torch.float32, attention)
        layouts.clear()
        result = loop.train(model, examples, cfg, pad_id=0, val_data=examples[:9])
        assert set(layouts) == {attention == "auto"}, layouts  # the stream's and validation's one_row
        losses[attention] = [*(h["loss"] for h in result.history), result.final_val_loss]
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=1e-5)
    assert losses["auto"][1] < losses["auto"][0]  # and it trains


def test_sdpa_blocks_keep_grouped_kv_and_one_mask_for_every_layer():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    blocks, heads, kv_heads, width, d = 3, 6, 2, 10, 8
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=True)
    q = torch.randn(blocks, heads, width, d, requires_grad=True)
    k, v = (torch.randn(blocks, kv_heads, width, d, requires_grad=True) for _ in range(2))
    see = torch.ones(width, width, dtype=torch.bool).tril().expand(blocks, 1, width, width)
    mask = A.additive(see, torch.float32, -torch.inf)
    with saved_bytes() as kept_theirs:
        theirs = sdpa_attention_forward(module, q, k, v, see, scaling=d ** -0.5)[0]
    with saved_bytes() as kept:
        ours = A._sdpa_blocks(module, q, k, v, mask, scaling=d ** -0.5)[0]
    assert torch.equal(ours, theirs)  # (blocks, width, heads, d), the same values
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    wide = blocks * heads * width * d * 4  # bytes of a tensor with every query head
    assert list(kept_theirs.values()).count(wide) == 4  # q, K and V repeated to every head, the output
    assert list(kept.values()).count(wide) == 2  # q and the output; K and V at their own head count:
    assert kept[k.untyped_storage().data_ptr()] == k.numel() * 4
    assert mask.untyped_storage().data_ptr() in kept  # the mask as given, not a per-layer float copy
    assert blocks * width * width * 4 in kept_theirs.values()  # transformers' path: the kernel's own float copy


def test_grouped_core_is_the_models_eager_attention_without_repeated_kv(monkeypatch):
    """The blocks' eager_recompute computes what the model's eager function does (fp32: to float rounding,
    gradients too), keeps for backward only q, K and V at their own head count and the mask, and hands
    calls with attention dropout or soft-capping to the model's function."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    blocks, heads, kv_heads, width, d = 3, 6, 2, 10, 8
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=True)
    q = torch.randn(blocks, heads, width, d, requires_grad=True)
    k, v = (torch.randn(blocks, kv_heads, width, d, requires_grad=True) for _ in range(2))
    see = torch.ones(width, width, dtype=torch.bool).tril().expand(blocks, 1, width, width).clone()
    see[0, 0, 6:, :6] = False  # the first block holds two examples
    mask = A.additive(see, torch.float32)
    theirs = eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)[0]
    with saved_bytes() as kept:
        ours = A._grouped_recompute(module, q, k, v, mask, scaling=d ** -0.5)[0]
    torch.testing.assert_close(ours, theirs)  # (blocks, width, heads, d)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    assert sorted(kept.values()) == sorted(t.numel() * 4 for t in (q, k, v, mask))
    calls = []
    monkeypatch.setattr(A, "_eager_recompute", lambda *a, **kw: calls.append(kw) or (None, None))
    A._grouped_recompute(module, q, k, v, mask, scaling=1.0, dropout=0.1)
    A._grouped_recompute(module, q, k, v, mask, scaling=1.0, softcap=30.0)
    assert len(calls) == 2
