"""The two queues block streaming orders its work on: the compute stream and a side stream for copies.

The streamer (`blocks.BlockStreamer`) speaks only this small interface, so the code that orders copies,
waits and frees is the same on every device: on CUDA the queues are CUDA streams and the markers CUDA events
(copies from pinned host memory run beside the compute); on the host both queues are the one thread, every
marker is complete when made and a copy is an ordinary copy, done before the next line runs. Tests record
the calls instead (tests/test_offload.py) to check the ordering.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor


class Queue(Protocol):
    """What torch.cuda.Stream offers that streaming uses."""

    def record_event(self) -> Any:
        """A marker that completes when the work queued so far on this queue has run."""
        ...

    def wait_event(self, event: Any) -> None:
        """Work queued on this queue from now on runs after `event` completes."""
        ...


class Streams(Protocol):
    compute: Queue
    side: Queue

    def on(self, queue: Queue) -> Any:
        """A context in which the work (kernels, copies) is queued on `queue`."""
        ...

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """dst <- src, queued on the current queue (asynchronous from pinned host memory on CUDA)."""
        ...

    def hand_over(self, tensor: Tensor, queue: Queue) -> None:
        """`tensor`, made on another queue, is read by `queue`: its memory is reused only after that work."""
        ...


class HostQueue:
    """One thread's work in program order: every marker is already complete when it is made."""

    def record_event(self) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None


class HostStreams:
    """The host: compute and copies run where they are called, in order."""

    def __init__(self) -> None:
        self.compute: Queue = HostQueue()
        self.side: Queue = HostQueue()

    def on(self, queue: Queue) -> Any:
        return nullcontext()

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src)

    def hand_over(self, tensor: Tensor, queue: Queue) -> None:
        return None


class CudaStreams:
    """The device's current stream computes (looked up at each use: a server thread may run on its own); one
    side stream of the same device copies."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side: Queue = torch.cuda.Stream(device)

    @property
    def compute(self) -> Queue:
        return torch.cuda.current_stream(self.device)

    @contextmanager
    def on(self, queue: Queue) -> Iterator[None]:
        with torch.cuda.stream(queue):  # type: ignore[arg-type]
            yield

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def hand_over(self, tensor: Tensor, queue: Queue) -> None:
        tensor.record_stream(queue)  # type: ignore[arg-type]


def device_streams(device: torch.device) -> Streams:
    return CudaStreams(device) if device.type == "cuda" else HostStreams()
