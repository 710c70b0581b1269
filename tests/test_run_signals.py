"""SIGTERM and SIGINT in every phase of a run (run.py; one mechanism: train/signals.py), the way a
user sends them to `loralab train`: each ends with one line, the output lock released and no file
half written. Preparation, loading and the base evaluation stop at once (exit 2, "interrupted by
SIG during <phase>"); training saves a checkpoint after its step; the final evaluation and saving
finish the run's files first (exit 0)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_cases import base_config, write
from loralab.cli import main
from loralab.io.lock import LOCK_NAME
from loralab.run import BASE_EVAL, FINAL_EVAL, LOAD, PREPARE, SAVE, TRAIN
from loralab.train import checkpoint
from loralab.train.signals import Interrupted, StopFlag

# `loralab train` that sends itself argv[2] as it enters the phase named argv[1]
SIGNAL_AT_PHASE = """
import os, signal, sys
from loralab.train.signals import StopFlag
from loralab.cli import main
real_enter = StopFlag.enter
def enter(self, phase, **kw):
    real_enter(self, phase, **kw)
    if phase == sys.argv[1]:
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
StopFlag.enter = enter
sys.exit(main(sys.argv[3:]))
"""

AT_ONCE = [PREPARE, LOAD, BASE_EVAL]
SIGNALS = ["SIGTERM", "SIGINT"]


def _config(tmp_path, tiny_folder) -> tuple[Path, Path]:
    out = tmp_path / "run"
    return write(tmp_path / "c.yaml", json.dumps(base_config(
        tiny_folder, out, train={"max_steps": 2, "save_every": 0},
        eval={"before": True, "tasks": ["2da"], "n": 2, "max_new_tokens": 2}))), out


@pytest.fixture
def train_with_signal(tiny_folder, tmp_path, monkeypatch, capsys):
    """`loralab train` in this process, sending itself the signal as the run enters the phase; a
    signal that reached no handler of loralab's fails the test (it would have killed the process)."""

    def run(phase: str, sig: str) -> tuple[int, str, Path]:
        cfg, out = _config(tmp_path, tiny_folder)
        real_enter = StopFlag.enter

        def enter(self, name, **kw):
            real_enter(self, name, **kw)
            if name == phase:
                os.kill(os.getpid(), getattr(signal, sig))

        def not_caught(signum, frame):
            raise AssertionError(f"{signal.Signals(signum).name} reached no loralab handler")

        monkeypatch.setattr(StopFlag, "enter", enter)
        previous = {s: signal.signal(s, not_caught) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            rc = main(["train", str(cfg)])
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return rc, capsys.readouterr().err, out

    return run


def _no_partial_files(out: Path) -> None:
    assert not (out / LOCK_NAME).exists(), "the lock was left behind"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name], "a half-written file"


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("phase", AT_ONCE)
def test_a_signal_before_training_stops_at_once_with_one_line(phase, sig, train_with_signal):
    rc, err, out = train_with_signal(phase, sig)
    assert rc == 2, err
    assert "Traceback" not in err and "received" not in err
    lines = err.strip("\n").splitlines()
    assert all(line.startswith("loralab: ") for line in lines), err  # progress lines, then the error
    assert lines[-1].startswith(f"loralab: error: interrupted by {sig} during {phase}; "), lines[-1]
    assert [line for line in lines if "error" in line] == lines[-1:]
    if phase == PREPARE:  # before anything was validated the output folder is not even created
        assert lines == lines[-1:] and "nothing was written" in lines[-1] and not out.exists()
        return
    _no_partial_files(out)
    assert not (out / "eval_before.json").exists() and not (out / "summary.json").exists()
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_during_training_saves_a_checkpoint_after_the_step(sig, train_with_signal):
    rc, err, out = train_with_signal(TRAIN, sig)
    assert rc == 2, err
    assert f"{sig} received; saving a checkpoint after this step" in err
    last = err.strip("\n").splitlines()[-1]
    assert last.startswith("loralab: error: interrupted at step 1; checkpoint saved in"), last
    assert checkpoint.load(checkpoint.latest(out / "checkpoints"))["step"] == 1
    assert not (out / "summary.json").exists()
    _no_partial_files(out)


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("phase", [FINAL_EVAL, SAVE])
def test_a_signal_after_the_last_step_finishes_the_files_first(phase, sig, train_with_signal):
    rc, err, out = train_with_signal(phase, sig)
    assert rc == 0, err
    assert f"{sig} received; finishing the final evaluation and save first" in err
    assert "the run finished its files first" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    _no_partial_files(out)


def test_sigterm_during_the_base_evaluation_of_the_command_is_exit_2_and_one_line(tiny_folder, tmp_path):
    """The process as a user runs it (the signal's default would be exit 143, no line, the lock left)."""
    cfg, out = _config(tmp_path, tiny_folder)
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_PHASE, BASE_EVAL, "SIGTERM", "train", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "loralab: error: interrupted by SIGTERM during the base evaluation; run the same command again")
    _no_partial_files(out)


def test_the_flag_raises_at_once_outside_deferred_phases_and_sets_itself_inside_them():
    flag = StopFlag()
    with flag.installed():
        flag.enter("loading", hint="run it again")
        with pytest.raises(Interrupted, match="interrupted by SIGTERM during loading; run it again"):
            flag._handler(signal.SIGTERM, None)
    flag = StopFlag()
    with flag.installed():
        flag.enter("training", deferred=True)
        flag._handler(signal.SIGTERM, None)
        assert flag.is_set()
        flag._handler(signal.SIGTERM, None)  # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts
            flag._handler(signal.SIGINT, None)
