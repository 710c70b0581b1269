"""A faster malloc for CPU training: the `loralab` command runs itself on tcmalloc or mimalloc.

glibc's malloc serves a training step badly. Activations come and go in sizes that change with every
packed micro batch; glibc splits its heap around them and leaves holes it cannot hand back, and it
returns large blocks to the OS (mmap) only to fault the pages in, zeroed, on the next step. On the
throughput benchmark's packed side tcmalloc was the fastest and leanest, then mimalloc once it keeps
freed pages for a while (MIMALLOC_PURGE_DELAY, set here), both well ahead of glibc; jemalloc was lean too
but slowed the bf16 matmuls, so it is used only when asked for (docs/performance.md, "Measurements behind
the code": runtime/allocator.py).

A malloc is chosen before the process starts (LD_PRELOAD), so the command line re-executes itself once,
with the allocator preloaded, before it imports torch. LORALAB_ALLOCATOR picks it: auto (tcmalloc where
the system has it, e.g. Debian's libtcmalloc-minimal4, else mimalloc from the cmeel-mimalloc package that
loralab depends on), tcmalloc, mimalloc, jemalloc, or system (glibc's: nothing is preloaded). A malloc the
user preloaded is kept. Linux only; library use (`import loralab`) runs on whatever malloc the process has.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from importlib import metadata
from pathlib import Path

from ..errors import UserError

ENV = "LORALAB_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "mimalloc", "jemalloc", "system")
AUTO_ORDER = ("tcmalloc", "mimalloc")  # fastest and leanest first (measured above)
_LIBS = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",), "mimalloc": ("mimalloc",)}
# Each allocator's settings, set unless the user set them: tcmalloc reports every allocation of 1 GiB and
# more on stderr (Llama 3 8B's embedding, 128k x 4,096, is one); mimalloc returns freed pages after 10 ms by default and
# then faults them back in on the next step (fewer tokens/s: docs/performance.md). Not -1 (never): then mi_collect
# cannot hand memory back either (release_free_pages, before a peak is measured).
_SETTINGS = {"tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)},
             "mimalloc": {"MIMALLOC_PURGE_DELAY": "10000"}}


def _pip_mimalloc() -> str | None:
    """libmimalloc from the cmeel-mimalloc wheel, if installed."""
    try:
        files = metadata.distribution("cmeel-mimalloc").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmimalloc.so"):
            path = Path(f.locate())
            if path.exists():
                return str(path)
    return None


def find(name: str) -> str | None:
    """The shared library of allocator `name` (a path or a soname LD_PRELOAD resolves), or None."""
    if name == "mimalloc" and (lib := _pip_mimalloc()):
        return lib
    for stem in _LIBS[name]:
        if lib := ctypes.util.find_library(stem):
            return lib
    return None


def choose(environ: dict) -> tuple[str, str] | None:
    """(name, library) to preload for LORALAB_ALLOCATOR in `environ`, or None: not Linux, `system`, a malloc
    already preloaded, or none installed under `auto`. Raises UserError for an unknown or missing choice."""
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(f"{ENV}={environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if "malloc" in environ.get("LD_PRELOAD", ""):
        return None  # the user's choice
    for name in AUTO_ORDER if choice == "auto" else (choice,):
        if lib := find(name):
            return name, lib
    if choice != "auto":
        raise UserError(f"{ENV}={choice}: no lib{_LIBS[choice][0]} found on this machine "
                        f"(install it, or set {ENV}=auto)")
    return None


def preload_env(environ: dict) -> dict | None:
    """`environ` plus the chosen allocator preloaded and its settings, or None when nothing changes."""
    picked = choose(environ)
    if picked is None:
        return None
    name, lib = picked
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, environ.get("LD_PRELOAD", "")) if p)
    for key, value in _SETTINGS.get(name, {}).items():
        env.setdefault(key, value)
    return env


def reexec_with_allocator() -> None:
    """Replace this process by itself with the allocator preloaded (same pid, arguments and stdio), once.
    The command line calls this first, before torch is imported."""
    env = preload_env(dict(os.environ))
    if env is None:
        return
    os.execve(sys.executable, sys.orig_argv, env)


# How each preloaded malloc hands its freed pages back to the OS (glibc's malloc_trim does it for glibc's heap).
_RELEASE = {"tcmalloc": ("MallocExtension_ReleaseFreeMemory", ()), "mimalloc": ("mi_collect", (ctypes.c_bool(True),))}


@functools.cache
def malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def release_free_pages() -> None:
    """Hand the pages malloc holds free back to the OS, on whichever malloc the process runs."""
    try:
        if entry := _RELEASE.get(active()):  # the process's global symbols hold a preloaded malloc's
            getattr(ctypes.CDLL(None), entry[0])(*entry[1])
    except (OSError, AttributeError):
        pass
    if trim := malloc_trim():
        trim(0)


def active() -> str:
    """The malloc this process runs on, from the libraries mapped into it: a name of _LIBS, or 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((n for n, stems in _LIBS.items() if any(f"lib{s}." in maps for s in stems)), "system")
