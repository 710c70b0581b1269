"""The CPU's flags and oneDNN's cap decide bf16 (train/precision.py) and the attention kernel (model/attention.py)."""
import pytest

from loralab.model import attention as A
from loralab.runtime import cpu

AMX_CPU = "model name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
BF16_CPU = AMX_CPU.replace(" amx_bf16 amx_tile", "")


@pytest.mark.parametrize("info, cap, amx", [(AMX_CPU, "", True), (AMX_CPU, "ALL", True),
                                            (AMX_CPU, "AVX512_CORE_AMX", True), (AMX_CPU, "AVX512_CORE_BF16", False),
                                            (AMX_CPU, "AVX2", False), (BF16_CPU, "", False), ("", "", False)])
def test_amx_counts_where_the_cpu_has_it_and_onednn_may_use_it(monkeypatch, info, cap, amx):
    monkeypatch.setattr(cpu, "cpu_info", lambda: info)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu.has_amx() is amx
    # bf16 `auto` attention: eager_recompute up to 256 tokens with AMX, up to 512 without; SDPA beyond
    limit = A.EAGER_MAX_ROW_AMX if amx else A.EAGER_MAX_ROW
    assert A.eager_max_row() == limit
    assert A.cpu_choice(limit, bf16=True) == A.RECOMPUTE and A.cpu_choice(limit + 1, bf16=True) == "sdpa"
    assert A.cpu_choice(16, bf16=False) == "sdpa"  # fp32: SDPA at every length, any CPU


def test_the_cpu_flags_are_read_from_proc_cpuinfo():
    info = cpu.cpu_info()
    assert info == "" or "flags" in info  # "" only where /proc/cpuinfo cannot be read
