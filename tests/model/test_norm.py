"""The lean RMSNorm: the module's own forward bit for bit, autograd's gradients, less kept for backward."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loralab.model.norm import use_lean_rmsnorm
from tinymodels import tiny_llama


def _pair(dtype, trained_weight):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.weight.requires_grad_(trained_weight)
    lean = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    lean.weight.data.copy_(ref.weight.data)
    lean.weight.requires_grad_(trained_weight)
    assert use_lean_rmsnorm(lean) == 1
    return ref, lean


def _run(m, x, g):
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward(g)
    return y, x.grad, m.weight.grad


@pytest.mark.parametrize("trained_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rmsnorm_gives_the_modules_output_and_autograds_gradients(dtype, trained_weight):
    ref, lean = _pair(dtype, trained_weight)
    x = (torch.randn(3, 17, 64) * 3).to(dtype)
    g = torch.randn(3, 17, 64).to(dtype)
    (y0, gx0, gw0), (y1, gx1, gw1) = _run(ref, x, g), _run(lean, x, g)
    assert torch.equal(y0, y1)  # the forward is the module's own, bit for bit
    if dtype == torch.float32:
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
        if trained_weight:
            torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5)
    else:  # bf16: each sum rounds in its own order; compare as a whole
        for a, b in ((gx1, gx0),) + (((gw1, gw0),) if trained_weight else ()):
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
    assert (gw1 is None) == (not trained_weight)


def test_lean_rmsnorm_keeps_the_bf16_input_not_an_fp32_copy():
    ref, lean = _pair(torch.bfloat16, False)
    x = torch.randn(4, 32, 64).to(torch.bfloat16).requires_grad_(True)
    kept = {}
    for name, m in (("ref", ref), ("lean", lean)):
        seen = {}
        pack = lambda t, seen=seen: seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        kept[name] = sum(seen.values())
    assert kept["lean"] < 0.7 * kept["ref"]  # x in bf16 (+ r) instead of its fp32 copy (+ r)


def test_every_llama_norm_is_switched_and_other_norms_keep_their_forward():
    model = tiny_llama(seed=1)
    n_layers = model.config.num_hidden_layers
    assert use_lean_rmsnorm(model) == 2 * n_layers + 1
    assert use_lean_rmsnorm(model) == 0  # already switched: not wrapped twice

    class GemmaLike(LlamaRMSNorm):  # scales by (1 + w): same attributes, another forward
        def forward(self, x):
            return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    assert use_lean_rmsnorm(GemmaLike(8)) == 0
    assert use_lean_rmsnorm(torch.nn.LayerNorm(8)) == 0
