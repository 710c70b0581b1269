"""Peak memory of a phase of work (training, not model loading), measured reliably.

CUDA: the allocator's own peak counters, reset at the start of the phase.
CPU (Linux): the kernel's peak resident set size (VmHWM), reset at the start of the phase by
writing 5 to /proc/self/clear_refs. Elsewhere a sampling thread is the fallback.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch

from ..runtime.allocator import active as active_allocator
from ..runtime.allocator import release_free_pages

_STATUS = Path("/proc/self/status")


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim, or the preloaded malloc's own call), so RSS
    measures live memory and not what earlier phases (loading, evaluation) freed but the allocator kept."""
    import gc

    gc.collect()
    release_free_pages()


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.result()` -> dict of bytes."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak = 0
        self.reserved = None
        self.method = ""
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
        else:
            release_free_memory()
            if _reset_hwm() and _vm_hwm_bytes() is not None:
                self.method = "cpu_peak_rss (VmHWM reset at start)"
            else:
                self.method = "cpu_rss_sampled_5ms"
                self.peak = current_rss_bytes()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        cuda = self.device.type == "cuda"
        self.start_bytes = torch.cuda.memory_allocated(self.device) if cuda else current_rss_bytes()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _vm_hwm_bytes() or 0
        return False

    def so_far(self) -> int:
        """The peak since the block began, read inside it (a checkpoint keeps it for a resumed run's summary)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(self.peak if self._thread is not None else _vm_hwm_bytes() or 0)

    def result(self) -> dict:
        out = {"peak_memory_bytes": int(self.peak), "memory_method": self.method,
               "memory_at_start_bytes": int(self.start_bytes)}
        if self.reserved is not None:
            out["cuda_peak_reserved_bytes"] = int(self.reserved)
        else:
            out["allocator"] = active_allocator()  # the CPU peak depends on the malloc (allocator.py)
        return out


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, named as such (KiB = 2^10 ... TiB = 2^40): "GB" would claim 10^9."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
