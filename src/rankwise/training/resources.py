"""Measuring what a trial costs: peak memory and time.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset at the start of the
measured span). On CPU it is the process's peak resident set size during the span,
sampled by a background thread every ``interval`` seconds (``ru_maxrss`` cannot be
reset, so it would report the peak of the whole process, not of one trial).

Freed memory stays resident on CPU: glibc keeps the heap pages of freed blocks below its
mmap threshold (a model's tensors, a tokenizer's buffers). A GGUF conversion in the same
process left 0.4-0.8 GiB of them, data preparation and the retain set's sampling ~0.1 GiB
(bench/RESULTS.md, "The demo's extra memory"). A span therefore starts from
:func:`live_rss`, which hands those pages back first: what earlier work freed is neither
counted in a trial's peak nor held while it trains, and the prediction's baseline
(:func:`resident_bytes`, read right before the trial) is the same quantity.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

__all__ = ["PeakMemory", "current_rss", "live_rss", "resident_bytes", "trim_heap"]


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the whole free pages of every malloc arena to the system (glibc
    ``malloc_trim(0)``, ~0.1 ms on a clean heap, ~70 ms with 0.8 GiB of freed blocks);
    False where there is no such call, and nothing changes."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def live_rss() -> int:
    """Resident memory this process still uses: its RSS once the freed heap pages are
    returned (:func:`trim_heap`; plain RSS where that is not available)."""
    trim_heap()
    return current_rss()


def resident_bytes(device: str = "cpu") -> int:
    """What a trial on ``device`` starts from, as :class:`PeakMemory` counts it: on CUDA the
    bytes of live tensors (``memory_allocated``), elsewhere :func:`live_rss`."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated(device))
    return live_rss()


class PeakMemory:
    """Context manager recording the peak memory of a span of work (on CPU from
    :func:`live_rss`: entering returns the heap's freed pages first).

    Example:
        >>> with PeakMemory("cpu") as peak:
        ...     x = bytearray(50 * 2**20)
        >>> peak.bytes > 50 * 2**20
        True
    """

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device = str(device)
        self.interval = interval
        self.bytes: int = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.bytes = live_rss()  # freed memory of earlier work is not this span's
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, current_rss())

    def poll(self) -> int:
        """Current peak so far (also samples once more on CPU)."""
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        self.bytes = max(self.bytes, current_rss())
        return self.bytes

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.bytes = self.poll()
        else:
            self.bytes = max(self.bytes, current_rss())
            self._stop.set()
            self._thread.join()
