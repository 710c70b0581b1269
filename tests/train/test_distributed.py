"""Data parallel training with torchrun (gloo, 2 processes on the CPU): N processes make the update
one process makes with the same global batch; shares are disjoint; a killed rank ends the job with
one line, and the rerun resumes bit-identically."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loralab.config import load_config
from loralab.data.batching import micro_batch_indices, rank_share
from loralab.pipeline import run_training
from tinymodels import random_encoded

RUN = ["data.tasks=[2da]", "data.template=raw", "data.val_fraction=0", "lora.r=4", "lora.dropout=0.0",
       "train.precision=fp32", "train.progress=false", "train.lr=1e-2", "eval.before=false", "eval.tasks=[]"]


def test_rank_shares_are_disjoint_and_cover_each_global_batch():
    data = random_encoded([5 + i % 7 for i in range(33)])
    for window in (0, 2):
        stream = micro_batch_indices(data, 8, seed=3, group_window=window)
        for _ in range(10):  # past the end of the first epoch: 33 = 4 x 8 + 1
            global_batch = next(stream)
            shares = [rank_share(global_batch, r, 2) for r in range(2)]
            real = [share for share, weight in shares if weight == 1.0]
            assert sorted(i for share in real for i in share) == sorted(global_batch)
            if len(global_batch) == 1:  # the uneven end: rank 1 stands in with weight 0
                assert shares[1] == (global_batch, 0.0)


def _train_cli(folder, out, *extra, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "loralab.cli", "train", f"model.name={folder}", f"output_dir={out}", *RUN, *extra,
           "--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _max_diff(a: Path, b: Path) -> float:
    x, y = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (a, b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.parametrize("mode, extra", [("ddp", []), ("fsdp", ["train.group_by_length=2"])])
def test_two_processes_make_the_one_process_update(tiny_folder, tmp_path, mode, extra):
    """33 examples, global micro batch 8 (2 x 4), accumulation 2: the epoch ends on a micro batch of
    one example (rank 1 stands in with weight 0), packing on (the default)."""
    common = ["data.n_train=33", "train.max_steps=3", "train.grad_accum=2", *extra]
    one = tmp_path / "one"
    run_training(load_config(None, [f"model.name={tiny_folder}", f"output_dir={one}", *RUN, *common,
                                    "train.batch_size=8"]), quiet=True)
    two = tmp_path / "two"
    proc = _train_cli(tiny_folder, two, *common, "train.batch_size=4", f"train.distributed={mode}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _max_diff(one, two) <= 1e-5
    steps = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]  # rank 0 alone writes
    summary = json.loads((two / "summary.json").read_text())
    ref = json.loads((one / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == mode
    assert summary["train_tokens"] == ref["train_tokens"]  # stand-ins count for nothing
    assert abs(summary["final_train_loss"] - ref["final_train_loss"]) <= 1e-5
    assert len(summary["peak_memory_bytes_per_rank"]) == 2
    assert "loralab run ->" in proc.stdout and proc.stdout.count("loralab run ->") == 1  # one table


def _rank_pids(out: Path, local_rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"output_dir={out}".encode() in cmd and f"LOCAL_RANK={local_rank}".encode() in env:
            pids.append(int(proc.name))
    return pids


def test_a_killed_rank_ends_the_job_in_one_line_and_the_rerun_is_bit_identical(tiny_folder, tmp_path):
    common = ["data.n_train=200", "train.max_steps=40", "train.batch_size=4", "train.grad_accum=2",
              "train.save_every=1", "lora.dropout=0.1", "train.warmup_steps=2"]  # dropout: RNG streams resume too
    ref = tmp_path / "ref"
    assert _train_cli(tiny_folder, ref, *common).returncode == 0
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "loralab.cli", "train", f"model.name={tiny_folder}", f"output_dir={out}", *RUN,
           *common, "--nproc", "2"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 8):
        time.sleep(0.02)
    victims = _rank_pids(out, 1)
    assert victims and job.poll() is None, "the job ended before a rank could be killed"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("loralab: error: rank 1 was killed (SIGKILL)"), err[-1500:]
    assert "Traceback" not in err and "ChildFailedError" not in err
    again = _train_cli(tiny_folder, out, *common)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    assert _max_diff(ref, out) == 0.0  # bit for bit


def test_an_error_on_every_rank_is_said_once(tiny_folder, tmp_path):
    proc = _train_cli(tiny_folder, tmp_path / "run", f"data.path={tmp_path / 'missing.jsonl'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("loralab: error:")]
    assert len(errors) == 1 and "missing.jsonl" in errors[0], proc.stderr[-1500:]


def test_resuming_with_another_number_of_processes_is_refused(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run_training(load_config(None, [f"model.name={tiny_folder}", f"output_dir={out}", *RUN, "data.n_train=16",
                                    "train.max_steps=2", "train.batch_size=4", "train.save_every=1"]), quiet=True)
    (out / "summary.json").unlink()
    proc = _train_cli(tiny_folder, out, "data.n_train=16", "train.max_steps=2", "train.batch_size=4",
                      "train.save_every=1")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("loralab: error:")]
    assert len(errors) == 1 and "written by 1 process(es), resumed by 2" in errors[0], proc.stderr[-1500:]
