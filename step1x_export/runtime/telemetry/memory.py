"""Peak memory of an edit: the CUDA allocator's peak on a GPU, the process's peak RSS on CPU.

On a GPU the allocator's figure misses everything torch does not allocate: TensorRT's and ONNX Runtime's
memory, cuBLAS / cuDNN workspaces, the CUDA context, and the allocator's own cached-but-free blocks.
`DriverMemory` samples what the driver reports in use (`torch.cuda.mem_get_info`: total - free, the
whole device, every process) at the end of each stage, before a sequential load frees it: the caching
allocator still holds the stage's peak blocks then, so the sample sees the stage's high-water mark.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakMemory:
    bytes: int | None
    what: str  # which counter the figure comes from
    driver_bytes: int | None = None  # device memory in use as the driver reports it (GPU only), see DriverMemory

    def __str__(self) -> str:
        if self.bytes is None:
            return "n/a"
        driver = "" if self.driver_bytes is None else f"; {self.driver_bytes / 2**30:.2f} GiB in use (driver)"
        return f"{self.bytes / 2**30:.2f} GiB ({self.what}){driver}"


class DriverMemory:
    """The most device memory in use (total - free, from the driver) over the samples taken."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def sample(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak or 0, total - free)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device, driver: DriverMemory | None = None) -> PeakMemory:
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated",
                          driver.peak if driver is not None else None)
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        # ru_maxrss is KiB on Linux, bytes on macOS; a process-lifetime peak, not per edit.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return PeakMemory(rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS")
    return PeakMemory(None, "unavailable")


def release_cached(device: torch.device) -> None:
    """Hand the allocator's cached blocks back to the driver (after freeing a stage)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_preset_memory(preset: str | None, real_model: bool, reason_edit: bool, device: torch.device) -> None:
    """At load on CUDA, the preset's planned peak against the device's free memory: raises naming a preset
    that fits when the chosen one does not (the plan is the real model's: tiny and toy models are not checked)."""
    if preset is None or device.type != "cuda" or not real_model:
        return
    from ...presets import check_fits

    free, _ = torch.cuda.mem_get_info(device)
    check_fits(preset, free, reason_edit, str(device))
