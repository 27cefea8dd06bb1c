"""Wall-clock timing helpers: device-synchronised timers and medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["synchronize", "timed", "median"]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, synchronising ``device`` before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("no timings to take the median of")
    return float(statistics.median(values))
