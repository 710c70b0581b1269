import pytest
import torch

from loralab.model import head as head_mod
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
    assert getattr(b, head_mod.SELECTED_HEAD) is True  # the fast path was taken
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
    assert getattr(m, head_mod.SELECTED_HEAD) is False
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
    assert checks and all(shape == (1, head_mod.CHECK_POSITIONS) for shape in checks)
    assert [shape for training, shape in seen if training] == [(3, 64)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [8, 1000])
def test_frozen_head_keeps_no_logits_and_gives_the_autograd_loss_and_gradient(bias, chunk_rows):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = (3 * torch.randn(37, 16)).requires_grad_(True)  # large logits: log-softmax, not log(softmax)
    labels = torch.randint(0, 50, (37,))
    want = loss_mod._head_ce_sum(head, hidden, labels)
    (g_want,) = torch.autograd.grad(2.5 * want, [hidden])
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        got = selected_head_loss(head, hidden, labels, chunk_rows=chunk_rows)
    assert all(50 not in s for s in shapes) and shapes  # nothing vocabulary-wide is kept for backward
    (g_got,) = torch.autograd.grad(2.5 * got, [hidden])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_frozen_head_in_bf16_rounds_as_autograd_when_told_the_gradient_scale():
    torch.manual_seed(1)
    head = torch.nn.Linear(64, 3000, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(200, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 3000, (200,))
    norm = 37.0  # the step divides the loss sum by its label count
    want = loss_mod._head_ce_sum(head, hidden, labels)
    (g_want,) = torch.autograd.grad(want / norm, [hidden])
    differ = {}
    for scale in (1.0, 1 / norm):
        got = selected_head_loss(head, hidden, labels, grad_scale=scale)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)  # the same fp32 loss of the same logits
        (g_got,) = torch.autograd.grad(got / norm, [hidden])
        torch.testing.assert_close(g_got.float(), g_want.float(), rtol=2e-2, atol=2e-5)
        differ[scale] = (g_got != g_want).float().mean().item()
    assert differ[1 / norm] < 0.005 < differ[1.0]  # told the scale, all but a few elements are autograd's


def test_lora_model_with_the_frozen_head_equals_the_full_logits_path():
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec

    def lora_model():
        m = tiny_llama(0)  # seeds the RNG, so both models' LoRA factors are drawn alike
        inject(m, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], LoraSpec(r=4, alpha=8))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
        return m

    batch = _batch(seed=2)
    a, b = lora_model(), lora_model()
    assert not b.lm_head.weight.requires_grad
    sa, _ = full_logits_loss_sum(a, batch)
    sb, _ = loss_sum(b, batch)
    assert sb.item() == pytest.approx(sa.item(), rel=1e-5)
    sa.backward()
    sb.backward()
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and len(ga) == 4
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6)
