"""The attention a loaded model runs: 'auto' per batch on the CPU, and eager with its core recomputed."""
import pytest
import torch

from loralab.model import attention as A
from loralab.train.loss import loss_sum
from tinymodels import load_converted, tiny_llama


def _batch(rows: int, length: int, vocab: int = 20) -> dict:
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_auto_attention_follows_the_row_length_in_bf16_with_the_same_loss(tiny_folder, monkeypatch):
    monkeypatch.setattr(A, "eager_max_row", lambda: 16)  # the tiny model's rows are short
    auto = load_converted(tiny_folder, torch.bfloat16, attn_implementation="auto")
    fixed = {a: load_converted(tiny_folder, torch.bfloat16, attn_implementation=a) for a in (A.RECOMPUTE, "sdpa")}
    assert auto.config._attn_implementation == A.RECOMPUTE
    for length, want in ((16, A.RECOMPUTE), (40, "sdpa"), (12, A.RECOMPUTE)):
        batch = _batch(2, length)
        got = loss_sum(auto, batch)[0]
        assert auto.config._attn_implementation == want, length
        assert torch.equal(got, loss_sum(fixed[want], batch)[0])
    for a, m in fixed.items():  # a chosen implementation is kept whatever the rows
        loss_sum(m, _batch(1, 40))
        assert m.config._attn_implementation == a


def test_auto_attention_in_fp32_is_sdpa_unless_bf16_autocast_computes(tiny_folder, monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    monkeypatch.setattr(A, "eager_max_row", lambda: 16)
    for interface in (AttentionInterface, AttentionMaskInterface):  # as in a fresh process
        monkeypatch.delitem(interface._global_mapping, A.RECOMPUTE, raising=False)
    monkeypatch.setattr(A, "_REGISTERED", [])
    auto = load_converted(tiny_folder, torch.float32, attn_implementation="auto")
    assert auto.config._attn_implementation == "sdpa"
    loss_sum(auto, _batch(2, 12))
    assert auto.config._attn_implementation == "sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # full fine-tuning's bf16: fp32 weights, bf16 matmuls
        loss_sum(auto, _batch(2, 12))
    assert auto.config._attn_implementation == A.RECOMPUTE


def _grads(model, batch, dropout_seed=None):
    model.zero_grad(set_to_none=True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    s, _ = loss_sum(model, batch)
    s.backward()
    return s.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_eager_attention_gives_eager_values_bit_for_bit_and_saves_less(dtype):
    eager = tiny_llama(seed=3, attn_implementation="eager", attention_dropout=0.1).to(dtype).train()
    eager.requires_grad_(True)
    batch = _batch(3, 24, vocab=100)
    want_loss, want = _grads(eager, batch, dropout_seed=7)
    saved = {}
    for name in ("eager", A.pick_attention(A.RECOMPUTE)):
        eager.set_attn_implementation(name)
        saved[name] = seen = set()
        pack = lambda t, seen=seen: seen.add(t.untyped_storage().data_ptr()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = _grads(eager, batch, dropout_seed=7)
        saved[name] = len(saved[name])
        assert torch.equal(loss, want_loss)
        assert grads.keys() == want.keys() and all(torch.equal(grads[k], want[k]) for k in want), name
    assert saved[A.RECOMPUTE] < saved["eager"]  # the probabilities are not kept


def test_the_config_offers_every_implementation():
    from loralab.config import CHOICES

    assert set(CHOICES["model.attn_implementation"]) == {"auto", "eager", A.RECOMPUTE, "sdpa"}


def test_auto_loads_sdpa_where_the_class_runs_it_else_eager_and_a_choice_is_kept():
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM

    assert A.pick_attention("auto", LlamaForCausalLM) == "sdpa"
    assert A.pick_attention("auto", Gemma2ForCausalLM) == "eager"  # soft-capping: transformers refuses SDPA
    assert A.pick_attention("auto", None) == "sdpa"
    assert A.pick_attention("sdpa", LlamaForCausalLM) == "sdpa" and A.pick_attention("eager") == "eager"
