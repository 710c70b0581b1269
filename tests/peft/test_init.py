"""lora.init: what a run is told about inits that move the base's principal part into the adapter."""
from __future__ import annotations

import pytest
import torch

from loralab.config import load_config
from loralab.peft.init import dropout_warning
from loralab.prepare import setup_model


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_dropout_on_an_init_that_moves_the_base_is_warned(init):
    line = dropout_warning(init, 0.05)
    assert line is not None and f"lora.init={init}" in line and "lora.dropout=0.05" in line
    assert dropout_warning(init, 0.0) is None


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_dropout_on_a_zero_start_init_is_not_warned(init):
    assert dropout_warning(init, 0.1) is None


def test_a_run_logs_the_warning_before_training(tiny_folder):
    cfg = load_config(None, [f"model.name={tiny_folder}", "lora.init=olora", "lora.dropout=0.1", "lora.r=4"])
    *_, info = setup_model(cfg, torch.device("cpu"))
    assert [n for n in info.notes if "lora.init=olora" in n and n.startswith("warning: ")]
    cfg = load_config(None, [f"model.name={tiny_folder}", "lora.init=olora", "lora.dropout=0", "lora.r=4"])
    *_, info = setup_model(cfg, torch.device("cpu"))
    assert not [n for n in info.notes if "lora.init" in n]


# --- seeded starts: each module's A from (run seed, module name) ------------------------------------------

def _start(tiny_folder, seed, *overrides):
    from loralab.peft.inject import lora_state_dict
    from loralab.train.state import set_seed

    set_seed(seed)
    cfg = load_config(None, [f"model.name={tiny_folder}", *overrides])
    model, *_ = setup_model(cfg, torch.device("cpu"))
    return {k: v.clone() for k, v in lora_state_dict(model).items()}


def test_cells_that_share_a_module_start_it_equal(tiny_folder):
    """Two runs of one seed that differ in targets start every module they both wrap with the same A
    (drawn in sequence, q_proj of the q+v run would follow other modules' draws); runs differing only
    in the learning rate start identically; another seed starts differently."""
    qv = _start(tiny_folder, 7, "lora.targets=[q_proj, v_proj]", "lora.r=4")
    every = _start(tiny_folder, 7, "lora.targets=all-linear", "lora.r=4")
    shared = [k for k in qv if k.endswith("lora_A.weight")]
    assert shared and set(qv) < set(every)
    for k in shared:
        assert torch.equal(qv[k], every[k]), k
        assert qv[k].abs().sum() > 0
    other_lr = _start(tiny_folder, 7, "lora.targets=[q_proj, v_proj]", "lora.r=4", "train.lr=1e-2")
    assert all(torch.equal(qv[k], other_lr[k]) for k in qv)
    other_seed = _start(tiny_folder, 8, "lora.targets=[q_proj, v_proj]", "lora.r=4")
    assert not torch.equal(qv[shared[0]], other_seed[shared[0]])
    # modules of one run differ from each other (the name is part of the seed)
    assert not torch.equal(qv[shared[0]], qv[shared[1]][: qv[shared[0]].shape[0], : qv[shared[0]].shape[1]])


def test_a_different_rank_changes_a_shape_so_nothing_is_shared(tiny_folder):
    """A of rank 4 and of rank 8 have different shapes: the seed pairs their data order and dropout, not A."""
    r4 = _start(tiny_folder, 7, "lora.targets=[q_proj]", "lora.r=4")
    r8 = _start(tiny_folder, 7, "lora.targets=[q_proj]", "lora.r=8")
    k = next(k for k in r4 if k.endswith("lora_A.weight"))
    assert r4[k].shape != r8[k].shape


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_seeded_factors_follow_the_init_distribution(init):
    """seed_factors draws what the init promises: kaiming U(-b, b) with b = 1/sqrt(in) (a=sqrt(5)),
    gaussian with std 1/r; dtype and device of the factor are kept."""
    from loralab.peft.init import module_seed, seed_factors

    a = torch.zeros(16, 4096, dtype=torch.bfloat16)
    seed_factors(a, init, 3, "layers.0.q_proj")
    assert a.dtype == torch.bfloat16 and a.abs().sum() > 0
    if init == "kaiming":
        bound = 1 / 4096 ** 0.5
        assert a.float().abs().max() <= bound * 1.01 and a.float().std() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    else:
        assert a.float().std() == pytest.approx(1 / 16, rel=0.05)
    assert module_seed(3, "x") == module_seed(3, "x") != module_seed(3, "y") != module_seed(4, "y")
    untouched = torch.ones(4, 8)
    seed_factors(untouched, "olora", 3, "x")  # a function of the weight: not redrawn
    assert torch.equal(untouched, torch.ones(4, 8))
