"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, exit with a resume hint."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager


class StopFlag:
    """Set by the first SIGINT/SIGTERM; a second SIGINT interrupts at once."""

    def __init__(self):
        self._event = threading.Event()

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handler(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._event.set()
        name = signal.Signals(signum).name
        print(f"\nloralab: {name} received; saving a checkpoint after this step "
              f"(Ctrl-C again to abort without one)", file=sys.stderr)

    @contextmanager
    def installed(self):
        """Install the handlers in the main thread (elsewhere signals cannot be caught: no-op)."""
        self._event.clear()
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
