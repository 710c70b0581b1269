"""The optimizers: torch's fused kernels where they apply, the same updates as torch's reference
(per-tensor, non-fused) implementation."""
import dataclasses

import pytest
import torch

from loralab.config import TrainConfig
from loralab.train.optim import build_optimizer, implementation


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((16, 24), (24, 16), (7,))]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_fused_step_on_the_cpu_equals_the_reference(name):
    cfg = dataclasses.replace(TrainConfig(), optimizer=name, lr=1e-2, weight_decay=0.1, momentum=0.9)
    ours, ref = _params(), _params()
    start = [p.detach().clone() for p in ours]
    opt = build_optimizer(ours, cfg)
    assert opt.defaults["fused"] is True
    if name == "adamw":
        oracle = torch.optim.AdamW(ref, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                   foreach=False)
    else:
        oracle = torch.optim.SGD(ref, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                 foreach=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        oracle.step()
    for a, b, s in zip(ours, ref, start):
        assert not torch.allclose(a, s)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_the_fused_kernel_cannot_take_get_foreach():
    assert implementation(_params()) == {"fused": True}
    assert implementation([{"params": _params()}, {"params": _params(1)}]) == {"fused": True}  # LoRA+'s groups
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    assert implementation(_params() + [meta]) == {"foreach": True}
