"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, exit with a resume hint.

After the last step the flag stays installed over the final evaluation and save, with another
note: a signal there waits for the run's files to be complete (pipeline.run_training)."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

DURING_TRAINING = "saving a checkpoint after this step (Ctrl-C again to abort without one)"


class StopFlag:
    """Set by the first SIGINT/SIGTERM; a second SIGINT interrupts at once. `note` is what the
    message says will happen next."""

    def __init__(self):
        self._event = threading.Event()
        self.note = DURING_TRAINING

    def is_set(self) -> bool:
        return self._event.is_set()

    def _handler(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._event.set()
        name = signal.Signals(signum).name
        print(f"\nloralab: {name} received; {self.note}", file=sys.stderr)

    @contextmanager
    def installed(self):
        """Install the handlers in the main thread (elsewhere signals cannot be caught: no-op)."""
        self._event.clear()
        self.note = DURING_TRAINING
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
