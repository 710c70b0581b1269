"""Model loading: the attention 'auto' picks, per batch on the CPU."""
import torch

from loralab.io import models as M
from loralab.train.loss import loss_sum


def _batch(rows: int, length: int, vocab: int = 20) -> dict:
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_auto_attention_follows_the_row_length_with_the_same_loss(tiny_folder, monkeypatch):
    monkeypatch.setattr(M, "EAGER_MAX_ROW", 16)  # the tiny model's rows are short
    auto = M.load_weights(tiny_folder, attn_implementation="auto")
    fixed = {a: M.load_weights(tiny_folder, attn_implementation=a) for a in ("eager", "sdpa")}
    assert auto.config._attn_implementation == "eager"
    for length, want in ((16, "eager"), (40, "sdpa"), (12, "eager")):
        batch = _batch(2, length)
        got = loss_sum(auto, batch)[0]
        assert auto.config._attn_implementation == want, length
        assert torch.allclose(got, loss_sum(fixed[want], batch)[0], rtol=1e-6)
    for a, m in fixed.items():  # a chosen implementation is kept whatever the rows
        loss_sum(m, _batch(1, 40))
        assert m.config._attn_implementation == a


def test_auto_attention_is_sdpa_on_cuda_and_a_choice_is_kept():
    assert M.pick_attention("auto", "cuda") == "sdpa" and M.pick_attention("auto", "cpu") == "eager"
    assert M.pick_attention("sdpa", "cpu") == "sdpa" and M.pick_attention("eager", "cuda") == "eager"
