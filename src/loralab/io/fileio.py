"""Atomic file writes: a reader (or a crash) never sees a half-written artifact.

Each writer puts the bytes in a temporary file in the destination folder (same filesystem, so the
final rename is atomic), flushes and fsyncs it, then `os.replace`s it over the target.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders are created). Returns the path."""
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Atomically create `path` from `write(file)`, which may write in as many pieces as it likes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the artifact the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def plain_permissions(root: str | os.PathLike) -> None:
    """Give a folder written through tempfile.mkdtemp (0700, and 0600 files from mkstemp-based writers)
    the modes a plain mkdir / open() would have under the current umask, before it is renamed into
    place: an exported folder is meant to be read by others (a serving user, a shared cache)."""
    mask = _umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a writer killed mid-write (SIGKILL, power loss) left in `folder`:
    `.<name>.<random>.tmp`, never renamed into place. Only for a folder no one else writes to now
    (a run holds its output_dir's lock). Returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); best effort where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Atomically write `obj` as pretty JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file, streamed one tensor at a time.

    safetensors' own `save` builds the whole file in memory first: for a full fine-tune's
    checkpoint that is a second copy of every weight and optimizer moment at the moment of saving
    (+1 GB at 135M parameters, +84 GB at 7B). The format is simple enough to write directly: an
    8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets; padded
    to 8 bytes), then each tensor's bytes. Tensors go largest element first, so every tensor stays
    aligned for readers that map the file. `metadata` defaults to {"format": "pt"}, which
    transformers/PEFT expect. Tensors are moved to the CPU and made contiguous (no copy when they
    already are).
    """
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for k, t in flat.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{k}: dtype {t.dtype} has no safetensors code")
    order = sorted(flat, key=lambda k: (-flat[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    for k in order:
        n = flat[k].numel() * flat[k].element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[flat[k].dtype], "shape": list(flat[k].shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for k in order:
            if flat[k].numel():  # a view of the tensor's own bytes: nothing copied
                f.write(memoryview(flat[k].reshape(-1).view(torch.uint8).numpy()))

    return atomic_write_with(path, write)
