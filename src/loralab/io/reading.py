"""Reading a user's input file whole, safely: a regular file, under a size cap, decoded as UTF-8.

A path can name something that is not a file: a FIFO (opening it for reading waits for a writer
that never comes), a device (/dev/zero never ends: the read grows until MemoryError), a socket.
The file is opened non-blocking and checked with fstat on the open descriptor, so what is checked
is what is read. Every refusal is a UserError naming the file. No torch here: config.py uses it.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UserError

MiB = 1 << 20
GiB = 1 << 30
# Caps: a YAML config or study file is a few KB, an adapter_config.json a few KB (its patterns list
# at most every module of a model); a data file is read whole into memory, so one larger than this
# is better given as a datasets folder or Parquet file, or split.
YAML_CAP = 4 * MiB
JSON_CONFIG_CAP = 16 * MiB
DATA_CAP = 4 * GiB

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def size_text(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def _check(p: Path, st: os.stat_result, what: str, cap: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise UserError(f"{p}: is {kind}, expected {_a(what)}")
    if cap is not None and st.st_size > cap:
        raise UserError(f"{p}: the {what} is {size_text(st.st_size)}, above the {size_text(cap)} loralab reads")


def check_file(path: str | os.PathLike, what: str, cap: int | None = None) -> None:
    """Refuse what read_bytes would, without opening it: for a file another library reads (a CSV or
    Parquet file read by `datasets`). stat() does not block on a FIFO, as opening one would.
    cap None: no size cap (a compressed Parquet file's size says little about its rows')."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{p}: no such {what}") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read the {what} ({e.strerror})") from None
    _check(p, st, what, cap)


def read_bytes(path: str | os.PathLike, what: str, cap: int) -> bytes:
    """The whole file, or a UserError: missing, not a regular file, larger than `cap`, unreadable.
    `what` names the expected file in messages ("data file", "YAML config file")."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{p}: no such {what}") from None
    except IsADirectoryError:
        raise UserError(f"{p}: is a directory, expected {_a(what)}") from None
    except OSError as e:
        raise UserError(f"{p}: cannot open the {what} ({e.strerror})") from None
    try:
        _check(p, os.fstat(fd), what, cap)
        chunks, total = [], 0
        while True:  # st_size can be stale (a file still growing): the cap holds for what is read
            chunk = os.read(fd, min(64 * MiB, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise UserError(f"{p}: the {what} grew past the {size_text(cap)} loralab reads")
        return b"".join(chunks)
    except OSError as e:
        raise UserError(f"{p}: cannot read the {what} ({e.strerror})") from None
    finally:
        os.close(fd)


def decode_utf8(raw: bytes, name: str) -> str:
    """UTF-8 text (a leading BOM dropped: editors on Windows add one), or a UserError naming the
    line, column and byte offset of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{name}:{line}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start}, "
                        f"column {column})") from None


def read_text(path: str | os.PathLike, what: str, cap: int) -> str:
    return decode_utf8(read_bytes(path, what, cap), str(path))
