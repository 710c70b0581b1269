"""`train.precision: auto` is decided in one place, and every caller (the loop, the pipeline) uses it."""
import pytest
import torch

import loralab.train.loop as loop
import loralab.train.precision as precision
from loralab.config import TrainConfig
from loralab.data.prompts import Encoded
from tinymodels import tiny_llama


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_resolves_from_the_cpu_flags(monkeypatch, fast_bf16):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if fast_bf16 else "fp32")
    assert precision.resolve_precision("fp32", "cpu") == "fp32" and precision.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_full_fine_tuning_with_auto_uses_autocast_where_bf16_is_fast(monkeypatch, fast_bf16):
    """train() called with precision 'auto' (no caller resolving it first) must still autocast a
    full fine-tune on bf16 hardware, and not on a CPU without bf16."""
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    seen = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **kw: (seen.append(kw["autocast"]), real(*a, **kw))[1])
    model = tiny_llama(0).requires_grad_(True)
    data = [Encoded(input_ids=list(range(3, 11)), labels=[-100] * 3 + list(range(6, 11)))] * 4
    cfg = TrainConfig(method="full", precision="auto", max_steps=2, batch_size=2, progress=False, lr=1e-3)
    loop.train(model, data, cfg, pad_id=0)
    assert seen == [fast_bf16] * 2
    cfg_lora = TrainConfig(method="lora", precision="auto")
    assert not loop.uses_autocast(cfg_lora, torch.device("cpu"))  # LoRA keeps bf16 weights instead


@pytest.mark.parametrize("cap, capped", [("AVX2", True), ("avx512_core", True), ("AVX512_CORE_VNNI", True),
                                         ("AVX512_CORE_BF16", False), ("AVX512_CORE_AMX", False), ("ALL", False),
                                         ("", False)])
def test_a_onednn_isa_cap_below_bf16_means_no_fast_bf16(monkeypatch, cap, capped):
    """ONEDNN_MAX_CPU_ISA=AVX2 reproduces an AVX2-only CPU on a newer one: `auto` must pick fp32 there."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision.isa_capped_below_bf16() is capped
    if capped:
        assert precision.cpu_has_fast_bf16() is False and precision.resolve_precision("auto", "cpu") == "fp32"
