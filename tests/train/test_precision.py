"""`train.precision: auto` is decided in one place, and every caller (the loop, the pipeline) uses it."""
import json

import pytest
import torch

import loralab.train.loop as loop
import loralab.train.precision as precision
from loralab.config import TrainConfig
from loralab.data.prompts import Encoded
from loralab.runtime import cpu
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
    assert cpu.isa_capped_below_bf16() is capped
    if capped:
        assert precision.cpu_has_fast_bf16() is False and precision.resolve_precision("auto", "cpu") == "fp32"


BF16_CPU = "model name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


@pytest.mark.parametrize("speedup, fast", [(0.62, False), (1.9, True)])
def test_bf16_flags_are_not_enough_the_speed_is_measured_once(monkeypatch, tmp_path, speedup, fast):
    """A CPU with AVX512-BF16 whose bf16 matmuls are slower than fp32's (seen: an Intel Xeon VM, 0.62x)
    trains in fp32; the measurement runs once per machine and is cached."""
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu, "cpu_info", lambda: BF16_CPU)
    calls = []
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: calls.append(1) or speedup)
    assert precision.cpu_has_fast_bf16() is fast and precision.resolve_precision("auto", "cpu") == (
        "bf16" if fast else "fp32")
    assert len(calls) == 1  # the second call read the cache
    (tmp_path / "cpu_bf16.json").write_text("{not json")  # a damaged cache is measured again, not fatal
    assert precision.cpu_has_fast_bf16() is fast and len(calls) == 2
    assert list(json.loads((tmp_path / "cpu_bf16.json").read_text()).values()) == [speedup]


def test_no_bf16_instructions_means_fp32_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "cpu_info", lambda: BF16_CPU.replace(" avx512_bf16", ""))
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: pytest.fail("measured on an AVX2-only CPU"))
    assert precision.cpu_has_fast_bf16() is False and not (tmp_path / "cpu_bf16.json").exists()
    assert precision.bf16_speedup() is None


def test_the_measurement_is_a_positive_ratio():
    assert 0 < precision.measure_bf16_speedup(rounds=1) < float("inf")


def test_an_unwritable_cache_folder_measures_instead_of_failing(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LORALAB_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu, "cpu_info", lambda: BF16_CPU)
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 1.5)
    assert precision.bf16_speedup() == 1.5
