"""The output folder's lock (loralab.io.lock): one holder at a time, released however the block
ends, and a lock left by a killed process taken over with a line naming it."""
import json
import signal
import subprocess
import sys

import pytest

from loralab.errors import UserError
from loralab.io.lock import LOCK_NAME, output_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with output_lock(tmp_path) as note:
        assert note is None
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        with pytest.raises(UserError) as e:
            with output_lock(tmp_path):
                pass
        assert "'output_dir'" in str(e.value) and f"pid {holder['pid']}" in str(e.value)
    assert not (tmp_path / LOCK_NAME).exists()
    with output_lock(tmp_path) as note:  # free again
        assert note is None


def test_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path):
            raise RuntimeError("the run failed")
    assert not (tmp_path / LOCK_NAME).exists()
    with output_lock(tmp_path):
        pass


def test_a_killed_holders_lock_is_taken_over_and_said(tmp_path):
    code = ("import sys, time; from loralab.io.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):  # alive: refused
            with output_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # SIGKILL left the file behind
    with output_lock(tmp_path) as note:
        assert note and f"pid {proc.pid}" in note and "no longer running" in note
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != proc.pid


@pytest.mark.parametrize("err", [OSError(30, "Read-only file system"), PermissionError(13, "Permission denied"),
                                 OSError(28, "No space left on device")], ids=["erofs", "eacces", "enospc"])
def test_an_unwritable_folder_is_one_line_naming_output_dir(err, tmp_path, monkeypatch):
    # root ignores chmod 555, so the mount's refusal is simulated where the lock file is created
    import loralab.io.lock as lock

    real_open = lock.os.open

    def refusing(path, flags, *args):
        if str(path).endswith(LOCK_NAME):
            raise err
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock.os, "open", refusing)
    with pytest.raises(UserError) as e:
        with output_lock(tmp_path):
            pytest.fail("the block must not run without the lock")
    assert str(e.value) == (f"config key 'output_dir': cannot create the lock file {tmp_path / LOCK_NAME} "
                            f"({err.strerror}); the folder must be writable: choose another output_dir")


def test_a_full_disk_when_writing_the_lock_is_one_line(tmp_path, monkeypatch):
    import loralab.io.lock as lock

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lock.os, "pwrite", full)
    with pytest.raises(UserError, match=r"cannot write the lock file .* \(No space left on device\)"):
        with output_lock(tmp_path):
            pytest.fail("the block must not run without the lock")
    monkeypatch.undo()
    with output_lock(tmp_path):  # nothing left held
        pass
