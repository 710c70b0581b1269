"""One `loralab train` per output folder: a lock file held for the whole run.

Two runs writing the same checkpoints, metrics.jsonl and adapter would each resume from, prune and
overwrite the other's files. The lock is `output_dir/.loralab.lock`, held with an exclusive
`flock` for as long as the run lasts and holding the owner's pid, host and start time (for the
message a second run gets). The kernel drops a flock when its process dies, however it dies, so a
lock file left by a killed run (SIGKILL, OOM killer, power loss) is stale by construction: the next
run takes it over and says so in one line. Reading pids instead would misjudge a reused pid.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".loralab.lock"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "unknown process"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}"


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[str | None]:
    """Hold folder's lock for the block; yields a line to log when a dead run's lock was taken over.
    Raises UserError naming output_dir when a live process holds it."""
    path = Path(folder) / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only mount (EROFS), no permission (EACCES), no room for an inode
            raise UserError(f"config key 'output_dir': cannot create the lock file {path} ({e.strerror}); "
                            "the folder must be writable: choose another output_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"config key 'output_dir': cannot lock {path} ({e.strerror})") from None
            raise UserError(f"config key 'output_dir': {folder} is in use by another loralab train "
                            f"({_describe(holder)}); wait for it to finish or choose another output_dir") from None
        try:  # the holder before us may have removed the file between our open and our lock: retry
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as e:  # a full disk or quota: the run could not write its files either
        os.close(fd)
        raise UserError(f"config key 'output_dir': cannot write the lock file {path} ({e.strerror})") from None
    note = (f"took over the lock {path} left by a run that is no longer running ({_describe(stale)})"
            if stale.get("pid") else None)
    try:
        yield note
    finally:
        try:
            os.unlink(path)  # before releasing: a newcomer never locks a file that is about to vanish
        except FileNotFoundError:
            pass
        os.close(fd)
