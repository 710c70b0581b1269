"""Checkpoints and exact resume: a run killed with SIGKILL and resumed ends bit-identical."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loralab.config import load_config
from loralab.errors import UserError
from loralab.pipeline import run_training
from loralab.train import checkpoint

STEPS = 14


def _config_file(tmp_path, folder, out, **extra):
    cfg = {"model": {"name": str(folder)},
           "lora": {"r": 4, "dropout": 0.1},  # dropout: the RNG state must be restored too
           "data": {"tasks": ["2da"], "n_train": 64, "template": "raw"},
           "train": {"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "save_every": 1,
                     "keep_checkpoints": 2, "progress": False, "precision": "fp32", "warmup_steps": 2},
           "eval": {"n": 4, "before": False},
           "output_dir": str(out)}
    for k, v in extra.items():
        cfg["train"][k] = v
    path = tmp_path / f"{Path(out).name}.json"  # JSON is YAML
    path.write_text(json.dumps(cfg))
    return path


def _train_cmd(cfg_path, *overrides):
    return [sys.executable, "-m", "loralab.cli", "train", str(cfg_path), *overrides]


def _steps_logged(out):
    p = Path(out) / "metrics.jsonl"
    if not p.exists():
        return 0
    return sum(1 for line in p.read_text().splitlines() if '"loss"' in line)


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "ref"
    subprocess.run(_train_cmd(_config_file(tmp, tiny_folder, out)), check=True, capture_output=True)
    return out


@pytest.mark.parametrize("kill_after", [3, 8, 12])
def test_sigkill_then_resume_is_bit_identical(tiny_folder, reference, tmp_path, kill_after):
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, tiny_folder, out)
    proc = subprocess.Popen(_train_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _steps_logged(out) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(out / "checkpoints") is not None
    assert not (out / "adapter").exists() or _steps_logged(out) >= STEPS
    done = subprocess.run(_train_cmd(cfg), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    a = (reference / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    losses = lambda o: [json.loads(l)["loss"] for l in (o / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses(out) == losses(reference)
    assert len(checkpoint.checkpoints(out / "checkpoints")) == 2  # keep_checkpoints


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = _config_file(tmp_path, tiny_folder, out, save_every=0, max_steps=400)
    proc = subprocess.Popen(_train_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while _steps_logged(out) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "run the same command again to resume" in err and "Traceback" not in err
    last = checkpoint.latest(out / "checkpoints")
    assert last is not None and json.loads((last / "state.json").read_text())["step"] >= 3


def test_resume_under_a_different_config_is_refused(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run_training(load_config(_config_file(tmp_path, tiny_folder, out, max_steps=2)), quiet=True)
    with pytest.raises(UserError) as e:
        run_training(load_config(_config_file(tmp_path, tiny_folder, out, max_steps=2, lr=5e-3)), quiet=True)
    assert "train.lr" in str(e.value) and "different config" in str(e.value)
    with pytest.raises(UserError):
        run_training(load_config(_config_file(tmp_path, tiny_folder, tmp_path / "fresh", max_steps=2),
                                 ["resume=true"]), quiet=True)


def test_failed_save_leaves_previous_checkpoint_intact(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_training(load_config(_config_file(tmp_path, tiny_folder, out, max_steps=2)), quiet=True)
    before = checkpoint.latest(out / "checkpoints")
    snap = checkpoint.load(before)
    files = {p.name: p.read_bytes() for p in before.iterdir()}

    real_save = checkpoint.atomic_save_safetensors

    def full_disk(tensors, path, metadata=None):  # the disk fills up halfway through a save
        if Path(path).name == "optimizer.safetensors":
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", full_disk)
    snap["step"] = 3
    with pytest.raises(UserError) as e:
        checkpoint.save(out / "checkpoints", _as_snapshot(snap), snap["config"])
    assert "No space left" in str(e.value) and "intact" in str(e.value)
    assert checkpoint.latest(out / "checkpoints") == before
    assert {p.name: p.read_bytes() for p in before.iterdir()} == files
    assert not list((out / "checkpoints").glob(".tmp-*"))


def _as_snapshot(loaded: dict) -> dict:
    return {"step": loaded["step"], "total_steps": loaded["total_steps"], "trainable": loaded["trainable"],
            "optimizer": loaded["optimizer"], "scheduler": loaded["scheduler"], "rng": loaded["rng"],
            "result": loaded["result"]}


def test_checkpoint_roundtrip_restores_rng_and_optimizer(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run_training(load_config(_config_file(tmp_path, tiny_folder, out, max_steps=3, optimizer="sgd")), quiet=True)
    snap = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    assert snap["step"] == 3 and snap["optimizer"]["state"]
    assert all("momentum_buffer" in s for s in snap["optimizer"]["state"].values())
    torch.set_rng_state(snap["rng"][0]["torch"])
    a = torch.rand(3)
    torch.set_rng_state(snap["rng"][0]["torch"])
    assert torch.equal(a, torch.rand(3))
    assert len(snap["result"]["history"]) == 3


def test_a_checkpoint_older_than_a_config_key_counts_it_at_its_default():
    current = load_config(None, []).to_dict()
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
    del older["lora"]["use_dora"], older["train"]["loraplus_lr_ratio"]  # written before these keys existed
    assert checkpoint.config_difference(older, current) is None
    dora = load_config(None, ["lora.use_dora=true"]).to_dict()
    assert checkpoint.config_difference(older, dora) == "lora.use_dora: False in the checkpoint vs True now"
