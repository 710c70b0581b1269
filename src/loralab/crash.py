"""Crash reports: what the CLI does with an exception that is not a UserError (a bug in loralab).

The user gets one line saying it is a bug and where the full report is; the report holds what a
bug report needs (the command line, versions, the traceback), so nobody has to rerun a long job to
see a traceback that scrolled away. Nothing here imports torch: the report must be writable when
importing torch is what failed.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Packages whose versions decide most bugs; read from their metadata, never imported here.
PACKAGES = ("loralab", "torch", "transformers", "safetensors", "peft", "datasets", "pyyaml", "numpy")


def crash_dir() -> Path:
    """Under loralab's cache (where models go), so reports stay with the machine's other state."""
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = os.environ.get("LORALAB_CACHE") or Path(xdg) / "loralab"
    return Path(root) / "crashes"


def _versions() -> list[str]:
    from importlib import metadata

    lines = [f"python {sys.version.split()[0]} ({sys.executable})", f"platform {platform.platform()}"]
    for name in PACKAGES:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return lines


def report_text(argv: list[str], exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    rank = os.environ.get("RANK")
    return "\n".join([
        "loralab crash report: an unexpected error (a bug in loralab; please report it with this file)",
        f"time {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"command {' '.join(argv)}",
        f"cwd {os.getcwd()}",
        *([f"rank {rank} of {os.environ.get('WORLD_SIZE')}"] if rank is not None else []),
        *_versions(), "", tb])


def write_crash_report(argv: list[str], exc: BaseException) -> Path | None:
    """Write the report; the cache folder first, the temp folder if that fails. None: neither was
    writable (the caller still says it is a bug)."""
    text = report_text(argv, exc)
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8", errors="backslashreplace")
            return path
        except OSError:
            continue
    return None


def bug_line(exc: BaseException, report: Path | None) -> str:
    """The one line on stderr: what broke, and where the traceback went."""
    what = " ".join(str(exc).split())[:200]
    where = f"the full traceback is in {report}" if report else "no crash report could be written"
    return (f"loralab: internal error: {type(exc).__name__}{': ' + what if what else ''}; this is a bug in loralab, "
            f"{where}")
