"""Peak memory of one callable: CUDA's allocator peak on a GPU, the process's peak RSS growth on the CPU."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch

__all__ = ["peak_memory"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(fn: Callable[[], object], device: torch.device, interval_s: float = 0.0005) -> dict:
    """Run ``fn()`` once and report its peak memory.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (``peak_bytes``), and the growth over
    what was allocated before (``delta_bytes``). CPU: the resident set size sampled from ``/proc/self/statm`` every
    ``interval_s`` by a background thread; ``delta_bytes`` = peak RSS during the call - RSS before it. The CPU number
    is a lower bound of the update's working memory (memory the allocator already holds is reused without growing
    the RSS) and includes nothing of the models' weights, which were resident before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated (reset before the update)", "peak_bytes": int(peak),
                "before_bytes": int(before), "delta_bytes": int(peak - before)}
    before = _rss_bytes()
    if before is None:
        fn()
        return {"method": "unavailable (no /proc/self/statm on this platform)", "peak_bytes": None,
                "before_bytes": None, "delta_bytes": None}
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > peak[0]:
                peak[0] = rss
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return {"method": f"CPU peak RSS delta: /proc/self/statm sampled every {interval_s * 1e3:g} ms during the update "
                      f"(a lower bound: memory the allocator already held is reused without growing the RSS)",
            "peak_bytes": int(peak[0]), "before_bytes": int(before), "delta_bytes": int(peak[0] - before)}
