"""Reading a user's file whole (loralab.io.reading): anything but a regular file is refused up front
in one line naming it, without blocking (a FIFO) or reading forever (/dev/zero); a size cap holds;
bad UTF-8 names the line, column and offset."""
import os
import threading

import pytest

from loralab.errors import UserError


def _within(seconds, fn):
    """fn() in a thread: its result or exception, or a failure if it blocks."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    from loralab.io.reading import read_bytes

    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"data\.jsonl: is a FIFO \(named pipe\), expected a data file"):
        _within(10, lambda: read_bytes(fifo, "data file", 1 << 20))


def test_a_device_is_refused_without_reading_it():
    from loralab.io.reading import read_bytes

    with pytest.raises(UserError, match=r"^/dev/zero: is a character device, expected a data file$"):
        _within(10, lambda: read_bytes("/dev/zero", "data file", 1 << 20))


def test_a_directory_and_a_missing_file(tmp_path):
    from loralab.io.reading import check_file, read_bytes

    with pytest.raises(UserError, match="is a directory, expected a data file"):
        read_bytes(tmp_path, "data file", 100)
    with pytest.raises(UserError, match="is a directory, expected a data file"):
        check_file(tmp_path, "data file", 100)
    with pytest.raises(UserError, match="nope.json: no such adapter config"):
        read_bytes(tmp_path / "nope.json", "adapter config", 100)


def test_the_size_cap(tmp_path):
    from loralab.io.reading import check_file, read_bytes

    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * 2048)
    assert read_bytes(path, "data file", 2048) == b"x" * 2048
    with pytest.raises(UserError, match=r"big\.jsonl: the data file is 2\.0 KiB, above the 1\.0 KiB loralab reads"):
        read_bytes(path, "data file", 1024)
    with pytest.raises(UserError, match="above the 1.0 KiB"):
        check_file(path, "data file", 1024)


def test_bad_utf8_names_line_column_and_offset():
    from loralab.io.reading import decode_utf8

    assert decode_utf8(b"\xef\xbb\xbfok\n", "f.txt") == "ok\n"  # a BOM is dropped
    with pytest.raises(UserError, match=r"^f\.txt:3: not UTF-8 text \(bad byte 0xff at offset 8, column 3\)$"):
        decode_utf8(b"ab\ncd\nef\xffgh\n", "f.txt")
