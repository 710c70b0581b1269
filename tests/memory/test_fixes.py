"""What makes a run fit (memory/fixes.py): every change offered fits (its stated estimate is the
estimator's for that change), none that does not; when nothing within reach fits, the printout names
the largest term and the memory the run needs as configured (issue 44's 70B QLoRA over 8 x 24 GiB)."""
import io
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest

from loralab.cli import main
from loralab.memory import arch as A
from loralab.memory import estimate as E
from loralab.memory import fixes as F
from loralab.memory.sharding import estimate_per_gpu

GiB = 2**30
QLORA_70B_8 = dict(method="qlora", r=8, targets="all-linear", seq=2048, batch=1, grad_checkpointing=True,
                   device="cuda", gpus=8, fsdp=True)


@pytest.fixture(scope="module")
def llama70b():
    return A.resolve_model_config("llama-2-70b")


def _estimate_cli(*args) -> str:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["estimate", *args]) == 0
    return out.getvalue()


def test_qlora_over_fsdp_is_told_that_nf4_is_not_sharded_and_offered_only_what_fits(llama70b):
    fixes = F.suggest_fixes(llama70b, 24, estimator=estimate_per_gpu, **QLORA_70B_8)
    assert fixes and all(f["fits"] for f in fixes)
    for f in fixes:  # each stated estimate is the estimator's for the stated change, under 24 GiB
        p = estimate_per_gpu(llama70b, **{**QLORA_70B_8, **f["settings"]})["peak_bytes"]
        assert p == f["peak_bytes"] <= 24 * GiB
    (combo,) = fixes
    assert combo["settings"]["method"] == "lora" and combo["settings"]["gpus"] == 9  # 16-bit weights shard
    assert estimate_per_gpu(llama70b, **{**QLORA_70B_8, "method": "lora", "gpus": 8})["peak_bytes"] > 24 * GiB
    text = _estimate_cli("--model", "llama-2-70b", "--method", "qlora", "--seq", "2048", "--grad-checkpointing",
                         "--gpus", "8", "--fsdp", "--gpu-gb", "24")
    assert "still over" not in text and "all of: :" not in text and "2048 -> 1 tokens" not in text
    assert "largest term: frozen weights 33.01 GiB on every GPU (QLoRA's NF4 base is whole on every GPU" in text
    peak = estimate_per_gpu(llama70b, **QLORA_70B_8)["peak_bytes"]
    assert f"as configured it needs {math.ceil(peak / GiB)} GiB per GPU" in text and math.ceil(peak / GiB) == 40
    assert "all of: LoRA on a bf16 base instead of QLoRA; 9 GPUs with --fsdp: 22.88 GiB (fits)" in text


def test_nothing_within_reach_says_so_with_the_memory_needed(llama70b):
    assert F.suggest_fixes(llama70b, 4, estimator=estimate_per_gpu, **QLORA_70B_8) == []
    text = _estimate_cli("--model", "llama-2-70b", "--method", "qlora", "--seq", "2048", "--grad-checkpointing",
                         "--gpus", "8", "--fsdp", "--gpu-gb", "4")
    assert "fits in 4 GiB: no" in text and "as configured it needs 40 GiB per GPU" in text
    assert "no change of micro batch, sharding, GPU count" in text and "    - " not in text


def test_a_sequence_is_never_cut_below_a_sixteenth(llama70b):
    kw = dict(QLORA_70B_8, gpus=1, fsdp=False, seq=4096)
    single = [f for f in F.suggest_fixes(llama70b, 40, **{k: v for k, v in kw.items() if k not in ("gpus", "fsdp")})
              if "seq" in f["settings"]]
    assert all(f["settings"]["seq"] >= 4096 // 16 for f in single)


@pytest.mark.parametrize("gpu_gb", [2, 6, 10, 20, 40])
@pytest.mark.parametrize("kw", [dict(method="lora", seq=4096, batch=8), dict(method="full", seq=1024, batch=4),
                                dict(method="qlora", seq=2048, batch=2, grad_checkpointing=True)])
def test_every_fix_offered_fits_and_the_combination_is_never_empty(kw, gpu_gb):
    cfg = A.resolve_model_config("llama-3.1-8b")
    for f in F.suggest_fixes(cfg, gpu_gb, **kw):
        assert f["fits"] and f["peak_bytes"] <= gpu_gb * GiB
        assert f["change"] != "all of: " and not f["change"].startswith("all of: ;")
        assert f["settings"]


def test_suggest_fixes_fit_and_are_empty_when_it_already_fits():
    cfg = A.resolve_model_config("llama-2-7b")
    kw = dict(method="lora", r=8, targets="qv", seq=2048, batch=4)
    assert E.estimate(cfg, **kw)["peak_bytes"] > F.gpu_bytes(24)
    fixes = F.suggest_fixes(cfg, 24, **kw)
    assert fixes and all(f["fits"] and f["peak_bytes"] <= F.gpu_bytes(24) for f in fixes)
    assert fixes[0]["settings"]["batch"] < 4  # a smaller micro batch, the same batch by accumulation
    assert fixes[0]["settings"]["grad_accum"] == -(-4 // fixes[0]["settings"]["batch"])
    for f in fixes:  # each stated estimate is the estimate of the stated change
        assert E.estimate(cfg, **{**kw, **f["settings"]})["peak_bytes"] == f["peak_bytes"]
    assert F.suggest_fixes(cfg, 80, **kw) == []


def test_suggest_fixes_combines_when_no_single_change_fits():
    cfg = A.resolve_model_config("llama-3.1-8b")
    fixes = F.suggest_fixes(cfg, 8, method="lora", seq=4096, batch=8)
    assert not any(f["fits"] for f in fixes[:-1])
    assert fixes[-1]["change"].startswith("all of") and fixes[-1]["fits"]
