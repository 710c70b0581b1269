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


def _lion_reference(params, grads_per_step, lr, wd, betas=(0.9, 0.99)):
    """Lion by its paper (Chen et al. 2023, Algorithm 2), written out: c = b1 m + (1 - b1) g,
    p <- p (1 - lr wd) - lr sign(c), m <- b2 m + (1 - b2) g."""
    ps = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for p, m, g in zip(ps, ms, grads):
            c = betas[0] * m + (1 - betas[0]) * g
            p.mul_(1 - lr * wd).sub_(lr * torch.sign(c))
            m.mul_(betas[1]).add_((1 - betas[1]) * g)
    return ps


def test_lion_steps_as_the_paper_writes_it():
    pytest.importorskip("lion_pytorch")
    cfg = dataclasses.replace(TrainConfig(), optimizer="lion", lr=3e-3, weight_decay=0.1)
    ours = _params()
    start = [p.detach().clone() for p in ours]
    opt = build_optimizer(ours, cfg)
    g = torch.Generator().manual_seed(5)
    steps = [[torch.randn(p.shape, generator=g) for p in ours] for _ in range(4)]
    for grads in steps:
        for p, grad in zip(ours, grads):
            p.grad = grad.clone()
        opt.step()
    for a, b in zip(ours, _lion_reference(start, steps, cfg.lr, cfg.weight_decay)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    assert sum(t.numel() for s in opt.state.values() for t in s.values()) == sum(p.numel() for p in ours)  # one m


def test_adafactor_keeps_factored_second_moments():
    """torch's Adafactor: a (rows, cols) matrix keeps a row and a column vector, not a matrix like
    AdamW's two; the step is torch's own (the optimizer is built with the run's lr and weight decay)."""
    cfg = dataclasses.replace(TrainConfig(), optimizer="adafactor", lr=1e-2, weight_decay=0.01)
    ours = _params()
    opt = build_optimizer(ours, cfg)
    assert isinstance(opt, torch.optim.Adafactor) and opt.defaults["lr"] == 1e-2
    assert opt.defaults["weight_decay"] == 0.01
    start = [p.detach().clone() for p in ours]
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(p, s) for p, s in zip(ours, start))
    state = opt.state[ours[0]]  # the (16, 24) matrix
    floats = [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 1]
    assert sorted(t.numel() for t in floats) == [16, 24]


def test_a_bad_optimizer_name_is_refused_at_the_config():
    from loralab.config import load_config
    from loralab.errors import UserError

    with pytest.raises(UserError, match="train.optimizer"):
        load_config(None, ["train.optimizer=sophia"])
    assert load_config(None, ["train.optimizer=lion"]).train.optimizer == "lion"


@pytest.mark.parametrize("name", ["adafactor", "lion"])
def test_a_tiny_run_trains_with_the_alternative_optimizers(name, tiny_folder, tmp_path):
    pytest.importorskip("lion_pytorch")
    from loralab.config import load_config
    from loralab.pipeline import run_training

    cfg = load_config(None, [f"model.name={tiny_folder}", "data.tasks=[2da]", "data.n_train=32", "data.template=raw",
                             "eval.n=4", "train.max_steps=3", "train.batch_size=4", "train.progress=false",
                             f"train.optimizer={name}", "train.lr=1e-3", "train.precision=fp32", "eval.before=false",
                             "eval.forgetting=false", f"output_dir={tmp_path}"])
    summary = run_training(cfg, quiet=True)
    assert summary["steps"] == 3 and summary["final_train_loss"] == summary["final_train_loss"]  # finite, not NaN
    from safetensors.torch import load_file
    b = [t for k, t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and any(t.abs().sum() > 0 for t in b)  # B left zero: the optimizer moved it
