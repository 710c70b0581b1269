"""`make gpu-check`'s CPU mode (benchmarks/gpu_check.py --device cpu --tiny): the same script as on a GPU, end
to end on tiny models, so it cannot rot. Every part reports rows, all pass or are CUDA-only skips, and the
run is bounded by its fixed step counts (asserted, not the wall time: 2 shared cores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ("nf4", "qlora_layer", "autocast", "packed_attention", "dropout", "fused", "compile", "preflight",
         "ddp", "fsdp", "article", "grid", "stacks")


def _env() -> dict:
    src = str(ROOT / "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_tiny_cpu_mode_runs_every_part_and_all_pass(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=1500)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = result["rows"]
    failed = [(r["check"], r["note"]) for r in rows if r["status"] != "pass" and not
              (r["status"] == "skipped" and r["note"].startswith("skipped: needs CUDA"))]
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tuple(result["parts"]) == PARTS and set(result["part_wall_s"]) == set(PARTS)
    for part in PARTS:
        assert any(r["part"] == part for r in rows), part
    # every comparison is against a tolerance it met; the CUDA-only rows are named as such
    for r in rows:
        if r["status"] == "pass" and "tolerance" in r and "max_abs_error" in r:
            assert r["max_abs_error"] <= r["tolerance"], r
    assert any(r["part"] == "preflight" and r["status"] == "skipped" for r in rows)
    assert any(r["part"] == "preflight" and r["status"] == "pass" for r in rows)  # the CPU reference path ran
    # bounded by step counts, not by wall time
    steps = result["steps"]
    assert steps["ddp"] == steps["fsdp"] == {"sgd_steps": 3, "world": 1}
    assert steps["article"]["optimizer_steps_per_length"] == 3 and steps["article"]["micro_batches_per_step"] == 2
    assert steps["grid"] == {"optimizer_steps": 2, "micro_batches_per_step": 1, "cells": 8}
    assert steps["stacks"]["steps"] * steps["stacks"]["micro_batch"] <= 6
    # the article's rows carry the estimate even where the peak cannot be measured, and the epoch projection
    article = [r for r in rows if r["part"] == "article"]
    assert sum(r.get("estimate_gb", 0) > 0 for r in article) == 2
    assert all(r["epoch_h"] > 0 for r in article if "epoch_h" in r)
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("\n| ") >= len(rows) and "| stacks |" in md
    for part in PARTS:  # per-part wall times printed as they finish
        assert f"gpu-check: {part}" in proc.stdout


def test_a_part_that_breaks_is_a_failed_row_and_the_run_exits_1(tmp_path, monkeypatch):
    """One broken part costs its rows, not the run: the others still report, and the exit code says it failed."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts its folders first: undone after the test
    spec = importlib.util.spec_from_file_location("gpu_check_main", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(ctx):
        raise RuntimeError("kernel missing")

    from common import PASS, row

    fine = lambda ctx: [row("dropout", "x", PASS)]  # noqa: E731
    monkeypatch.setattr(gpu_check, "all_parts", lambda: {"nf4": broken, "dropout": fine})
    assert gpu_check.main(["--device", "cpu", "--tiny", "--parts", "nf4,dropout", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["part"], r["status"]) for r in result["rows"]] == [("nf4", "fail"), ("dropout", "pass")]
    assert "RuntimeError: kernel missing" in result["rows"][0]["note"]
    assert "| nf4 | the part ran | fail |" in (tmp_path / "gpu_check.md").read_text()


def test_a_stack_that_fails_with_liger_runs_again_without_it(monkeypatch):
    """TRL's side with Liger kernels that break is rerun without them (the row says so); a side that fails
    anyway is a failed row, not the end of the run (throughput's driver ends a failed worker with SystemExit)."""
    monkeypatch.setattr(sys, "path", [str(ROOT / "benchmarks" / "gpu_check"), str(ROOT / "benchmarks"), *sys.path])
    import stacks

    import throughput

    tried = []

    def worker(kind, spec, threads):
        tried.append(spec["liger"])
        if spec["liger"]:
            raise SystemExit("worker baseline/baseline-sft failed (exit 1):\nliger kernel error")
        return {"side": "baseline-sft"}

    monkeypatch.setattr(throughput, "_run_worker", worker)
    res, note = stacks._side(throughput, "baseline-sft", {"liger": True})
    assert res == {"side": "baseline-sft"} and tried == [True, False]
    assert note.startswith("failed with Liger") and "liger kernel error" in note

    def broken(kind, spec, threads):
        raise SystemExit("worker loralab/packed failed (exit 1):\nout of memory")

    monkeypatch.setattr(throughput, "_run_worker", broken)
    assert stacks._side(throughput, "packed", {"liger": False}) == (None, "worker loralab/packed failed (exit 1):\n"
                                                                           "out of memory")
