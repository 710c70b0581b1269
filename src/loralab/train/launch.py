"""`loralab train CONFIG --nproc N`: torchrun for one machine, with one clear line when a rank fails.

torchrun starts the N ranks (`python -m loralab.cli train ...` each, which join the process group
from its environment) and ends them all when one fails. Every rank's output goes to its own log
file (torchrun's --log-dir / --redirects); rank 0's is shown here as it is written, and on a failure
the ranks' `loralab: error:` lines are shown once each, or what ended a rank that said nothing
(a signal, an exit code), instead of torchrun's multi-line report.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import UserError


def torchrun_command(config: str | None, overrides: list[str], nproc: int, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--log-dir",
            str(log_dir), "--redirects", "3", "-m", "loralab.cli", "train", *([config] if config else []),
            *overrides]


ERROR = "loralab: error: "


def _follow(log_dir: Path, name: str, sink, done: threading.Event) -> None:
    """Copy local rank 0's log `name` to `sink` as it grows (progress bars included), until `done`,
    leaving out its error lines: the launcher prints the job's one error line itself."""
    path = None
    while path is None and not done.is_set():
        path = next(iter(log_dir.glob(f"*/attempt_*/0/{name}")), None)
        done.wait(0.1)
    if path is None:
        return
    held = ""  # the start of a line that may turn out to be an error line
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            text = f.read(65536)
            if not text:
                if done.is_set():
                    return
                time.sleep(0.1)
                continue
            *lines, last = (held + text).split("\n")
            out = [line + "\n" for line in lines if not line.startswith(ERROR)]
            held = last if ERROR.startswith(last[:len(ERROR)]) else ""
            out.append("" if held else last)
            sink.write("".join(out))
            sink.flush()


CRASH_SIGNALS = ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")  # the process itself says why, on stderr


def _last_words(log_dir: Path, rank: str, signal_name: str) -> str:
    """What a rank that crashed (not one killed from outside) last wrote on stderr, as '; it said: ...'."""
    if signal_name not in CRASH_SIGNALS:
        return ""
    for err in log_dir.glob(f"*/attempt_*/{rank}/stderr.log"):
        lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return f"; it said: {lines[-1][:200]}"
    return ""


def failure_line(log_dir: Path, torchrun_err: str) -> str:
    """The one line that says why the job failed: a rank that was killed first (torchrun's root
    cause), then the ranks' own error lines, each once."""
    said: list[str] = []
    for err in sorted(log_dir.glob("*/attempt_*/*/stderr.log"), key=lambda p: int(p.parent.name)):
        for line in err.read_text(errors="replace").splitlines():
            if line.startswith(ERROR) and line[len(ERROR):] not in said:
                said.append(line[len(ERROR):])
    root = torchrun_err.partition("Root Cause")[2] or torchrun_err
    ended = re.search(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", root)
    if said and not (ended and int(ended.group(2)) < 0):
        return "; ".join(said)  # the ranks said what went wrong
    if ended and int(ended.group(2)) < 0:
        name = signal.Signals(-int(ended.group(2))).name if -int(ended.group(2)) in signal.valid_signals() else ""
        said.insert(0, f"rank {ended.group(1)} was killed ({name or ended.group(2)})"
                    + _last_words(log_dir, ended.group(1), name))
    else:
        said.append(f"rank {ended.group(1)} ended with exit code {ended.group(2)}" if ended else "torchrun failed")
    return "; ".join(said) + ". Checkpoints already written are intact: the same command resumes"


def launch(config: str | None, overrides: list[str], nproc: int, output_dir: str) -> int:
    """Run the training on `nproc` local processes; returns the exit code (2 with one line on failure)."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torchrun-", dir=output_dir) as tmp:
        log_dir = Path(tmp)
        done = threading.Event()
        followers = [threading.Thread(target=_follow, args=(log_dir, name, sink, done), daemon=True)
                     for name, sink in (("stderr.log", sys.stderr), ("stdout.log", sys.stdout))]
        for t in followers:
            t.start()
        proc = subprocess.Popen(torchrun_command(config, overrides, nproc, log_dir), stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)
        try:
            _, err = proc.communicate()
        except KeyboardInterrupt:  # torchrun passes the signal on to the ranks: they checkpoint and stop
            _, err = proc.communicate()
        done.set()
        for t in followers:
            t.join()
        if proc.returncode == 0:
            return 0
        print(ERROR + failure_line(log_dir, err), file=sys.stderr)
        return 2
