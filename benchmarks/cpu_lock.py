"""The benchmarks' shared CPU lock, /tmp/loralab_cpu_lock: whoever times something holds it, the
others wait, so two timed runs never share the two cores. `enabled = False` (a benchmark's
--no-lock) neither waits nor holds it."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

LOCK = Path("/tmp/loralab_cpu_lock")
enabled = True


def _holder_gone(holder: str) -> bool:
    """The lock names a process of this machine that no longer runs."""
    m = re.search(r"pid (\d+)", holder)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user
        return False
    return False


def wait() -> None:
    """Return once nobody holds the lock. A lock left by a killed run (its pid gone) is removed:
    it would otherwise block every later run."""
    said = False
    while LOCK.exists():
        try:
            holder = LOCK.read_text().strip()[:80]
        except OSError:
            holder = "?"
        if _holder_gone(holder):
            LOCK.unlink(missing_ok=True)
            continue
        if not said:
            print(f"waiting for {LOCK} ({holder})...", file=sys.stderr)
            said = True
        time.sleep(5)


def acquire(what: str) -> None:
    """Wait for the lock, then hold it (for one worker: a few minutes at most)."""
    if enabled:
        wait()
        LOCK.write_text(f"benchmarks {what} (pid {os.getpid()}, {time.strftime('%H:%M:%S')})\n")


def release() -> None:
    if enabled:
        try:
            if f"pid {os.getpid()}" in LOCK.read_text():
                LOCK.unlink()
        except OSError:
            pass
