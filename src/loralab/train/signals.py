"""SIGINT / SIGTERM over a whole run, one mechanism for every phase (the run object names them).

A phase either stops at once or finishes what it is doing first:
- preparing, loading the model, the base evaluation (`enter(phase, hint=...)`): the first signal
  raises Interrupted where the run is; the run's `with` blocks release the output lock, every file
  is written atomically (io/fileio.py), and `installed()` turns it into one UserError line
  "interrupted by SIGTERM during <phase>; <hint>" (exit 2 at the CLI).
- training, the final evaluation and saving (`enter(phase, deferred=True, note=...)`): the first
  signal sets the flag and prints what happens next. The loop polls it, finishes its step and
  writes a checkpoint; after the last step the run completes its files rather than leave them to
  be redone. A second SIGINT interrupts at once (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

from ..errors import UserError

DURING_TRAINING = "saving a checkpoint after this step (Ctrl-C again to abort without one)"


class Interrupted(BaseException):
    """Raised by the handler in a phase that stops at once. A BaseException, as KeyboardInterrupt:
    no `except Exception` on the way up may swallow it; `StopFlag.installed` turns it into a UserError."""


class StopFlag:
    """Set by the first SIGINT/SIGTERM in a deferred phase; in any other phase that signal raises
    Interrupted. `note` is what the message says will happen next; `phase` names where the run is."""

    def __init__(self):
        self._event = threading.Event()
        self.note = DURING_TRAINING
        self.phase = "the run"
        self.hint = "run the same command again"
        self.deferred = False
        self._raised = False

    def is_set(self) -> bool:
        return self._event.is_set()

    def enter(self, phase: str, *, deferred: bool = False, note: str = DURING_TRAINING,
              hint: str = "run the same command again") -> None:
        """The run begins `phase`: a signal from now on stops at once (with `hint` in its line), or,
        deferred, sets the flag and prints `note`."""
        self.phase, self.deferred, self.note, self.hint = phase, deferred, note, hint

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self._raised or (self._event.is_set() and self.deferred):
            if signum == signal.SIGINT:  # asked twice: abort at once
                raise KeyboardInterrupt
            return
        if not self.deferred:
            self._raised = True
            raise Interrupted(f"interrupted by {name} during {self.phase}; {self.hint}")
        self._event.set()
        print(f"\nloralab: {name} received; {self.note}", file=sys.stderr)

    @contextmanager
    def installed(self):
        """Install the handlers in the main thread (elsewhere signals cannot be caught: phases are
        still recorded) for the block; an Interrupted inside it leaves as one UserError line."""
        self._event.clear()
        self._raised = False
        self.enter("the run")
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        except Interrupted as e:
            raise UserError(str(e)) from None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
