"""Atomic file writes: a reader (or a crash) never sees a half-written artifact.

Each writer puts the bytes in a temporary file in the destination folder (same filesystem, so the
final rename is atomic), flushes and fsyncs it, then `os.replace`s it over the target.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

def _umask() -> int:
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (parent folders are created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Atomically write `obj` as pretty JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file. Tensors are moved to CPU and made contiguous first.

    `metadata` defaults to {"format": "pt"}, which transformers/PEFT expect on their files.
    Tensors must not share storage (safetensors refuses aliased tensors); clone them if they do.
    """
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(flat, metadata=metadata if metadata is not None else {"format": "pt"}))
