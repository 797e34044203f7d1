"""Wall time and peak memory of a block of code (CPU: resident set size; CUDA: allocator peak)."""

from __future__ import annotations

import os
import threading
import time

import torch

__all__ = ["PeakMemory", "rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; falls back to ``ru_maxrss``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring seconds and the peak memory *added* while it is open.

    On CPU a thread samples the resident set size every ``interval`` seconds; on CUDA the
    allocator's peak is used. ``peak_mb`` is the peak minus the value on entry; on CUDA
    ``peak_reserved_mb`` is the same for the memory the caching allocator reserved (cached blocks
    and CUDA graph pools included).

    Examples
    --------
    >>> import torch
    >>> with PeakMemory() as m:
    ...     x = torch.ones(1_000_000)
    >>> m.peak_mb >= 0.0, m.seconds >= 0.0
    (True, True)

    On CPU, freed heap memory is handed back to the system on entry (``gc.collect`` and glibc's
    ``malloc_trim``); memory the process still holds elsewhere is reused before the resident set
    grows, so measure in a fresh process (as ``python -m momaestimator.bench.scale`` does) for
    numbers you want to compare.
    """

    def __init__(self, device="cpu", interval=0.002):
        self.device = torch.device(device)
        self.interval = interval

    def __enter__(self):
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_mem = torch.cuda.memory_allocated(self.device)
            self._start_reserved = torch.cuda.memory_reserved(self.device)
        else:
            # freed heap memory back to the system first, so growth into it is counted (it would
            # otherwise be reused without the resident set growing)
            import gc

            from ..merging.fit import release_free_memory

            gc.collect()
            release_free_memory()
            self._start_mem = self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device) - self._start_reserved
            self.peak_reserved_mb = max(0.0, reserved / 2**20)
        else:
            self._peak = max(self._peak, rss_bytes())
            self._stop.set()
            self._thread.join()
            peak = self._peak
        self.seconds = time.perf_counter() - self._t0
        self.peak_mb = max(0.0, (peak - self._start_mem) / 2**20)
        return False
