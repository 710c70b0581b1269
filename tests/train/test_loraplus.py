"""LoRA+ (train.loraplus_lr_ratio): B and DoRA's magnitudes learn at ratio x lr; one step equals
PEFT's create_loraplus_optimizer step on the same weights."""
import dataclasses

import pytest
import torch

from loralab.config import TrainConfig
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec, lora_modules
from loralab.train.optim import build_optimizer, build_scheduler
from tinymodels import tiny_llama

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))


def _ours(use_dora):
    m = tiny_llama(0)
    inject(m, "qv", LoraSpec(r=4, alpha=8, dropout=0.0, use_dora=use_dora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.1)
    return m


def _peft_twin(ours, use_dora):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, mod in lora_modules(ours):
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(mod.lora_A.weight)
            layer.lora_B["default"].weight.copy_(mod.lora_B.weight)
            if use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(mod.lora_magnitude_vector)
    return pm


def test_b_and_magnitudes_get_ratio_times_lr():
    m = _ours(use_dora=True)
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=16.0)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, cfg)
    slow, fast = opt.param_groups
    assert slow["lr"] == 1e-3 and fast["lr"] == 16e-3
    names = {id(p): n for n, p in named}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in slow["params"]} == {"lora_A"}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in fast["params"]} == {"weight", "lora_magnitude_vector"}
    assert len(fast["params"]) == 2 * len(slow["params"])  # a B and a magnitude per A
    sched = build_scheduler(opt, 10, dataclasses.replace(cfg, warmup_steps=2))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-3, 8e-3])  # the schedule scales both
    del sched
    assert len(build_optimizer(named, TrainConfig(lr=1e-3)).param_groups) == 1  # off: one group


@pytest.mark.parametrize("use_dora", [False, True])
def test_one_step_equals_peft_create_loraplus_optimizer(use_dora):
    from peft.optimizers import create_loraplus_optimizer

    ours = _ours(use_dora)
    pm = _peft_twin(ours, use_dora)
    cfg = TrainConfig(lr=2e-3, loraplus_lr_ratio=8.0, weight_decay=0.01, betas=[0.9, 0.99])
    opt = build_optimizer([(n, p) for n, p in ours.named_parameters() if p.requires_grad], cfg)
    peft_opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=8.0,
                                         loraplus_weight_decay=0.01, betas=(0.9, 0.99))
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    for model, o in ((ours, opt), (pm, peft_opt)):
        for _ in range(2):
            model(input_ids=IDS, labels=IDS).loss.backward()
            o.step()
            o.zero_grad()
    for name, mod in lora_modules(ours):
        layer = pm.base_model.model.get_submodule(name)
        pairs = [(mod.lora_A.weight, layer.lora_A["default"].weight),
                 (mod.lora_B.weight, layer.lora_B["default"].weight)]
        if use_dora:
            pairs.append((mod.lora_magnitude_vector, layer.lora_magnitude_vector["default"].weight))
        for mine, theirs in pairs:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all((p - start[n]).abs().max() > 1e-4 for n, p in ours.named_parameters() if p.requires_grad)
