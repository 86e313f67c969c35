"""Measuring what a trial costs: peak memory and time.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset at the start of the
measured span). On CPU it is the process's peak resident set size during the span,
sampled by a background thread every ``interval`` seconds (``ru_maxrss`` cannot be
reset, so it would report the peak of the whole process, not of one trial).
"""

from __future__ import annotations

import os
import threading

__all__ = ["PeakMemory", "current_rss"]


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager recording the peak memory of a span of work.

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
            self.bytes = current_rss()
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
