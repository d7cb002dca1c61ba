"""Denoising progress and step timings that follow the device, not the host.

With CUDA graphs (and asynchronous kernels in general) the host queues all steps in milliseconds;
a bar that counted Python calls would reach 28/28 before the GPU finished the first step. A CUDA
event is recorded after each queued step; the bar advances as events complete (polled on each
step, then waited on in order at the end), and the events give each step's duration. On CPU the
steps run synchronously and the host clock is the truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from ...step1x_ref.sampling import ProgressFn

if TYPE_CHECKING:
    from ...step1x_ref.sampling import Lane


class StepEvents:
    """The `progress` callback handed to `sampling.denoise`: records step ends, forwards completed steps."""

    def __init__(self, device: torch.device, progress: ProgressFn | None = None):
        self.cuda = device.type == "cuda"
        self.progress = progress
        self.total = 0
        self.reported = 0
        self._ends: list[torch.cuda.Event | float] = []
        self._start = self._mark()

    def _mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, queued: int, total: int) -> None:
        """Step `queued` of `total` was issued: mark its end and report whatever has completed."""
        self.total = total
        self._ends.append(self._mark())
        self._report(wait=False)

    def finish(self) -> None:
        """Wait for the remaining steps in order, reporting each as it completes."""
        self._report(wait=True)

    def _report(self, *, wait: bool) -> None:
        while self.reported < len(self._ends):
            end = self._ends[self.reported]
            if isinstance(end, torch.cuda.Event):
                if wait:
                    end.synchronize()
                elif not end.query():
                    return
            self.reported += 1
            if self.progress is not None:
                self.progress(self.reported, self.total)

    def step_seconds(self) -> list[float]:
        """Each finished step's duration (device time between consecutive events on CUDA)."""
        self.finish()
        marks = [self._start, *self._ends]
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in pairwise(marks)]  # type: ignore[union-attr]
        return [b - a for a, b in pairwise(marks)]  # type: ignore[operator]


class LatentTap:
    """A lane's progress callback that also hands its tokens to `latents` after each step (live previews):
    scoped to the one edit that asked, so other edits of the batch pay nothing."""

    def __init__(self, events: StepEvents, lane: Lane, latents: Callable[[torch.Tensor], None]):
        self.events, self.lane, self.latents = events, lane, latents

    def __call__(self, queued: int, total: int) -> None:
        self.events(queued, total)
        self.latents(self.lane.x)
