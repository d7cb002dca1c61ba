"""Admission and ordering of edits over one runtime: a bounded FIFO, a deadline, and cancellation.

One edit runs at a time (a runtime's static buffers and CUDA graphs are shared), in a worker thread so the
event loop keeps answering health checks and metrics. A request waiting in the queue that is cancelled
(client gone, deadline passed) simply leaves it; a running one is stopped at its next denoising step
through its `Cancel` token, and the slot is freed only once the runtime has really let go.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EditCancelled(Exception):
    """Raised inside a running edit (from its progress callback) once its request no longer wants it."""


class Cancel:
    """A thread-safe cancel flag the edit checks between denoising steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise EditCancelled(self.reason)


@dataclass
class Admitted(Generic[T]):
    value: T
    queued_s: float  # seconds spent waiting for the runtime
    run_s: float  # seconds the edit itself took


class EditQueue:
    """At most `max_queue` waiting plus one running; everything else is refused at once with QueueFull."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0
        self._slot = asyncio.Semaphore(1)  # FIFO: waiters acquire in arrival order
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step1x-edit")
        self._recent_run_s: list[float] = []

    def retry_after_s(self) -> int:
        """A client's sensible wait: the queue ahead of it times the recent mean edit time (at least 1 s)."""
        mean = sum(self._recent_run_s) / len(self._recent_run_s) if self._recent_run_s else 1.0
        return max(1, math.ceil((self.waiting + self.running) * mean))

    async def run(self, work: Callable[[Cancel], T], cancel: Cancel) -> Admitted[T]:
        """Queue `work`, run it alone in the worker thread, and return its result with the time it waited.

        Cancelling the awaiting task cancels the work: in the queue it leaves at once; running, it is
        told through `cancel` and this coroutine waits for the worker to stop before re-raising.
        """
        if self.waiting + self.running > self.max_queue:
            raise QueueFull(self.retry_after_s())
        t0 = time.perf_counter()
        self.waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self.waiting -= 1
        try:
            queued_s = time.perf_counter() - t0
            cancel.check()  # cancelled while it waited: the runtime never sees it
            self.running += 1
            job = asyncio.get_running_loop().run_in_executor(self._executor, work, cancel)
            try:
                t1 = time.perf_counter()
                value = await asyncio.shield(job)
                run_s = time.perf_counter() - t1
            except asyncio.CancelledError:
                cancel.set("cancelled")
                await asyncio.wait([job])  # the runtime stops at its next step; keep the slot until then
                if not job.cancelled():
                    job.exception()  # retrieved: the request's cancellation is the outcome, not this error
                raise
            finally:
                self.running -= 1
        finally:
            self._slot.release()
        self._recent_run_s = [*self._recent_run_s[-15:], run_s]
        return Admitted(value, queued_s, run_s)

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)
