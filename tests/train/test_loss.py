import pytest
import torch

from loralab.train import loss as loss_mod
from loralab.train.loss import full_logits_loss_sum, loss_sum, selected_head_loss
from tinymodels import tiny_llama


def _batch(seed=0, bs=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (bs, length), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100           # prompt masked
    labels[1, 9:] = -100           # padding on row 1
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_selected_positions_equal_full_logits_loss_and_grads():
    batch = _batch()
    a, b = tiny_llama(0), tiny_llama(0)
    for m in (a, b):
        m.requires_grad_(True)
    sa, na = full_logits_loss_sum(a, batch)
    sb, nb = loss_sum(b, batch)
    assert getattr(b, loss_mod._OK_ATTR) is True  # the fast path was taken
    assert na == nb == int((batch["labels"][:, 1:] != -100).sum())
    assert sb.item() == pytest.approx(sa.item(), rel=1e-5)
    sa.backward()
    sb.backward()
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6)


def test_chunked_head_loss_equals_one_chunk():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    one = selected_head_loss(head, hidden, labels, chunk_rows=1000)
    g_one = torch.autograd.grad(one, [hidden, head.weight])
    many = selected_head_loss(head, hidden, labels, chunk_rows=8)
    g_many = torch.autograd.grad(many, [hidden, head.weight])
    assert many.item() == pytest.approx(one.item(), rel=1e-6)
    for x, y in zip(g_one, g_many):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_head_that_is_not_a_plain_linear_falls_back():
    class SoftCapped(torch.nn.Module):
        """A model whose logits are not head(hidden): the fast path must notice and step aside."""
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama(0)
            self.base_model_prefix = "model"
            self.model = self.inner.model

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = 3.0 * torch.tanh(out.logits)  # soft-capping changes the logits
            return out

    m = SoftCapped()
    batch = _batch()
    s, n = loss_sum(m, batch)
    ref, _ = full_logits_loss_sum(m, batch)
    assert getattr(m, loss_mod._OK_ATTR) is False
    assert s.item() == pytest.approx(ref.item(), rel=1e-6)


def test_the_one_time_path_check_looks_at_a_few_positions_only():
    # It runs before the first step; on a whole row (1,024 tokens x 49k vocabulary) its fp32 logits
    # were the step's largest allocation, so it must stay bounded whatever the sequence length.
    m = tiny_llama(0)
    seen = []
    m.model.register_forward_pre_hook(lambda mod, args, kw: seen.append((mod.training, kw["input_ids"].shape)),
                                      with_kwargs=True)
    m.train()
    loss_sum(m, _batch(length=64))
    checks = [shape for training, shape in seen if not training]
    assert checks and all(shape == (1, loss_mod.CHECK_POSITIONS) for shape in checks)
    assert [shape for training, shape in seen if training] == [(3, 64)]
