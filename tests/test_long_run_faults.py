"""Faults a long run meets, the way a user meets them (`loralab train`):
- the newest checkpoint is corrupt or cut short: resume falls back to the one before and says so;
- the data changed between a run and its resume: refused (the checkpoint records its fingerprint);
- a second `loralab train` into the same output folder while one runs: refused (a lock file);
- SIGTERM or SIGKILL during the final save: complete files (old or new), and a rerun finishes;
- memory pressure: a run whose address-space limit (`ulimit -v`) is below its estimate is refused
  by the pre-flight check, before any weight loads, with exit 2 and one line.
"""
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_cases import _one_error_line, base_config, digest, run_cli, write
from loralab.cli import main
from loralab.io.lock import LOCK_NAME, output_lock
from loralab.train import checkpoint

STEPS = 3


def _config(tmp_path, tiny_folder, out, name="c.yaml", **sections) -> Path:
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": STEPS, **sections["train"]}
    return write(tmp_path / name, json.dumps(base_config(tiny_folder, out, **sections)))


def _adapter(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory):
    """A finished 3-step run with checkpoints at steps 2 and 3: the reference every resume must equal."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    assert main(["train", str(_config(root, tiny_folder, out))]) == 0
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000003"]
    return out


def _copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---------------------------------------------------------------------------------------------
# A corrupt newest checkpoint

def _flip_a_data_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def _cut_in_half(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(path: Path):
    state = json.loads(path.read_text())
    state["result"]["history"][0]["loss"] += 0.5  # still valid JSON, wrong content
    path.write_text(json.dumps(state))


CORRUPTIONS = {
    "bit-rot-in-weights": ("trainable.safetensors", _flip_a_data_byte, "sha256"),
    "optimizer-cut-short": ("optimizer.safetensors", _cut_in_half, "optimizer.safetensors"),
    "state-json-cut-short": ("state.json", _cut_in_half, "JSONDecodeError"),
    "state-json-edited": ("state.json", _edit_state, "checksum"),
    "rng-file-missing": ("rng.safetensors", lambda p: p.unlink(), "rng.safetensors"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(case, finished, tiny_folder, tmp_path, capsys):
    out = _copy_of(finished, tmp_path)
    name, corrupt, reason = CORRUPTIONS[case]
    corrupt(out / "checkpoints" / "step-00000003" / name)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", str(_config(tmp_path, tiny_folder, out))]) == 0
    err = capsys.readouterr().err
    (skipped,) = [line for line in err.splitlines() if "skipped, resuming from the one before" in line]
    assert skipped.startswith("loralab: warning: ") and "step-00000003: unreadable checkpoint" in skipped
    assert reason in skipped
    assert "resuming from " + str(out / "checkpoints" / "step-00000002") in err
    assert _adapter(out) == _adapter(finished)  # step 3 redone: bit-identical to the uninterrupted run
    assert checkpoint.load(checkpoint.latest(out / "checkpoints"))["step"] == STEPS  # re-saved whole


def test_every_checkpoint_unreadable_is_one_error_line(finished, tiny_folder, tmp_path, capsys):
    out = _copy_of(finished, tmp_path)
    for ckpt in checkpoint.checkpoints(out / "checkpoints"):
        _flip_a_data_byte(ckpt / "trainable.safetensors")
    before = digest(out)
    run_cli(capsys, "train", _config(tmp_path, tiny_folder, out),
            expect=["step-00000003: unreadable checkpoint", "no older checkpoint", "resume=false"])
    assert digest(out) == before


# ---------------------------------------------------------------------------------------------
# The data changed between a run and its resume

def test_resume_on_changed_data_is_refused(tiny_folder, tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", "".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n"
                                                  for i in range(12)))
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_folder, out, data={"path": str(data), "tasks": []})
    assert main(["train", str(cfg)]) == 0
    data.write_text(data.read_text().replace('"5+1="', '"5+2="'))  # one example edited in place
    before = digest(out)
    run_cli(capsys, "train", cfg, expect=["step-00000003", "training data changed", f"data.path {data}",
                                          "resume=false"])
    assert digest(out) == before
    data.write_text(data.read_text().replace('"5+2="', '"5+1="'))  # restored: resumes again
    assert main(["train", str(cfg)]) == 0


# ---------------------------------------------------------------------------------------------
# A second `loralab train` into the same output folder

def test_second_train_into_a_locked_output_dir_is_refused(finished, tiny_folder, tmp_path, capsys):
    out = _copy_of(finished, tmp_path)
    with output_lock(out):  # as a running `loralab train` holds it
        before = digest(out)
        line = run_cli(capsys, "train", _config(tmp_path, tiny_folder, out),
                       expect=["'output_dir'", "in use by another loralab train", "choose another output_dir"])
        assert digest(out) == before
    assert "pid " in line


def test_second_train_while_one_runs_end_to_end(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_folder, out, train={"max_steps": 100_000, "save_every": 0})
    first = subprocess.Popen([sys.executable, "-m", "loralab.cli", "train", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and (out / LOCK_NAME).exists()
        second = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(cfg)],
                                capture_output=True, text=True, timeout=120)
        _one_error_line(second.returncode, second.stderr, "in use by another loralab train", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with output_lock(out) as note:  # the killed run's lock is stale: taken over, and said
        assert note and f"pid {first.pid}" in note


# ---------------------------------------------------------------------------------------------
# A signal during the final save

# Runs `loralab train` with a signal sent to itself when the adapter's weights are about to be
# renamed into place: the middle of the final save.
SIGNAL_AT_FINAL_SAVE = """
import os, signal, sys
from loralab.cli import main
real_replace = os.replace
def replace(src, dst, *a, **kw):
    if str(dst).endswith("adapter_model.safetensors"):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real_replace(src, dst, *a, **kw)
os.replace = replace
sys.exit(main(sys.argv[2:]))
"""


def _train_with_signal_at_final_save(sig: str, cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_AT_FINAL_SAVE, sig, "train", str(cfg)],
                          capture_output=True, text=True, timeout=300)


def test_sigterm_during_the_final_save_finishes_the_files_first(finished, tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_folder, out)
    proc = _train_with_signal_at_final_save("SIGTERM", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM received; finishing the final evaluation and save first" in proc.stderr
    assert "the run finished its files first" in proc.stderr
    assert _adapter(out) == _adapter(finished)
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert not (out / LOCK_NAME).exists() and not list(out.rglob(".*.tmp"))
    assert main(["train", str(cfg)]) == 0  # a rerun finishes (from the final checkpoint)
    assert _adapter(out) == _adapter(finished)


@pytest.mark.parametrize("over_a_finished_run", [False, True], ids=["first-save", "over-the-old-files"])
def test_sigkill_during_the_final_save_leaves_complete_files_and_a_rerun_finishes(over_a_finished_run, finished,
                                                                                  tiny_folder, tmp_path):
    out = _copy_of(finished, tmp_path) if over_a_finished_run else tmp_path / "run"
    old_summary = (out / "summary.json").read_bytes() if over_a_finished_run else None
    cfg = _config(tmp_path, tiny_folder, out)
    proc = _train_with_signal_at_final_save("SIGKILL", cfg)
    assert proc.returncode == -signal.SIGKILL
    assert list((out / "adapter").glob(".adapter_model.safetensors.*.tmp"))  # the write it cut short
    if over_a_finished_run:  # the old files, complete and unchanged
        assert _adapter(out) == _adapter(finished) and (out / "summary.json").read_bytes() == old_summary
    else:  # no adapter at all rather than half of one
        assert not (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()
    assert checkpoint.load(checkpoint.latest(out / "checkpoints"))["step"] == STEPS
    assert main(["train", str(cfg)]) == 0  # takes over the dead run's lock, resumes, finishes
    assert _adapter(out) == _adapter(finished)
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert not list(out.rglob(".*.tmp")) and not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# Memory pressure: a real limit below the estimate

AS_LIMIT = 4 * 2**30  # torch, transformers and the tokenizer map ~0.8 GB of address space


def _seven_b_folder(tiny_folder, tmp_path) -> Path:
    """Llama-2-7B's config.json with the tiny tokenizer and weights that are not weights at all:
    a run that read them would fail with another error than the pre-flight's."""
    folder = tmp_path / "llama-2-7b-shaped"
    folder.mkdir()
    for f in tiny_folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    from loralab.memory.arch import resolve_model_config

    (folder / "config.json").write_text(json.dumps(resolve_model_config("llama-2-7b")))
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_run_above_its_address_space_limit_is_refused_before_loading(tiny_folder, tmp_path):
    if _meminfo_available() < AS_LIMIT:
        pytest.skip("MemAvailable is below the test's ulimit -v: that would be the tighter limit")
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_folder, out, model={"name": str(_seven_b_folder(tiny_folder, tmp_path))},
                  train={"precision": "bf16"})
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(cfg)], capture_output=True, text=True,
                          timeout=120, preexec_fn=limit)
    line = _one_error_line(proc.returncode, proc.stderr, "not enough memory", "estimated peak", "ulimit -v 4.00 GiB",
                           "train.preflight=warn")
    assert "fits with" in line or "no change" in line
    assert not out.exists()  # refused before the output folder was created (or locked)
