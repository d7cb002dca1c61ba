"""Peak memory of an edit: the CUDA allocator's peak on a GPU, the process's peak RSS on CPU."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakMemory:
    bytes: int | None
    what: str  # which counter the figure comes from

    def __str__(self) -> str:
        return "n/a" if self.bytes is None else f"{self.bytes / 2**30:.2f} GiB ({self.what})"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> PeakMemory:
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated")
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        # ru_maxrss is KiB on Linux, bytes on macOS; a process-lifetime peak, not per edit.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return PeakMemory(rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS")
    return PeakMemory(None, "unavailable")


def release_cached(device: torch.device) -> None:
    """Hand the allocator's cached blocks back to the driver (after freeing a stage)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
