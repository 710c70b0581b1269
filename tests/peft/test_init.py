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
