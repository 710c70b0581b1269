import pytest
import torch

from conftest import tiny_llama
from loralab import lora as lora_lib
from loralab.lora_branch import _Branch, dropout_keep_mask, lean_forward, use_lean_branch


def _layer(dtype, p=0.1, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(48, 40, bias=True).to(dtype).requires_grad_(False)
    m = lora_lib.LoRALinear(base, r=4, alpha=8, dropout=p)
    torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    return m.train()


def _run(m, x, forward, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = forward(m, x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = [x.grad.clone(), m.lora_A.weight.grad.clone(), m.lora_B.weight.grad.clone()]
    m.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3])
def test_lean_branch_equals_stock_forward_and_gradients(dtype, tol, p):
    m = _layer(dtype, p)
    x = torch.randn(3, 7, 48).to(dtype)
    y0, g0 = _run(m, x, lora_lib.LoRALinear.forward, seed=5)
    y1, g1 = _run(m, x, lean_forward, seed=5)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-6)  # same mask, same products
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_lean_branch_in_eval_and_no_grad_is_the_plain_branch():
    m = _layer(torch.float32, 0.2)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        y_train = lean_forward(m, x)  # training mode under no_grad: dropout still applies
        m.eval()
        torch.testing.assert_close(lean_forward(m, x), lora_lib.LoRALinear.forward(m, x))
    assert y_train.shape == (2, 5, 40)


def test_keep_mask_rate_and_dtype():
    torch.manual_seed(0)
    keep = dropout_keep_mask(torch.empty(1000, 100), 0.05)
    assert keep.dtype == torch.bool and keep.shape == (1000, 100)
    assert abs(keep.float().mean().item() - 0.95) < 0.005


def _saved_bytes(fn):
    total, seen = [0], set()

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_lean_branch_saves_less_for_backward():
    """A frozen base saves nothing of x for its own backward. Stock: a bf16 mask and the dropped
    input per layer (4 bytes per element); lean: x once, shared by layers reading the same input,
    plus a bool mask per layer (1 byte). Three layers on one input (q, k, v): 12 vs 5 bytes."""
    layers = [_layer(torch.bfloat16, 0.05, seed=k) for k in range(3)]
    x = torch.randn(4, 64, 48, dtype=torch.bfloat16, requires_grad=True)
    n = x.numel()
    stock, _ = _saved_bytes(lambda: [lora_lib.LoRALinear.forward(m, x) for m in layers])
    lean, _ = _saved_bytes(lambda: [lean_forward(m, x) for m in layers])
    small = 3 * 8192  # per layer: the frozen weight, the bf16 factor copies, u = A h (r per token)
    assert 12 * n <= stock <= 12 * n + small
    assert 5 * n <= lean <= 5 * n + small


def test_use_lean_branch_trains_a_model_like_the_stock_one():
    def run(lean):
        model = tiny_llama(seed=3).float()
        lora_lib.inject(model, "all-linear", r=4, alpha=8, dropout=0.1)
        if lean:
            assert use_lean_branch(model) == len(list(lora_lib.lora_modules(model)))
        model.train()
        torch.manual_seed(9)
        ids = torch.randint(3, 128, (2, 12))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    (l0, g0), (l1, g1) = run(False), run(True)
    assert l1 == pytest.approx(l0, rel=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
