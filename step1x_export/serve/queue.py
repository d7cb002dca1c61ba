"""Admission and ordering of edits over one runtime: batches joined at step boundaries, admission by deadline.

A worker thread runs `Step1XEditRuntime.edit_batch`: the oldest waiting edit starts a batch, and at every
denoising step boundary the waiting edits of the same size join it (up to `max_batch`, in arrival order:
joining stops while an edit of another size is first in line, so it runs next). The event loop keeps
answering health checks and metrics meanwhile. A request is admitted only while its predicted completion
(`Forecast`: measured step times, the work ahead of it) fits its deadline; otherwise it is refused at once
with a Retry-After of the predicted wait. A waiting request that is cancelled (client gone, deadline passed)
leaves the line; a running one leaves its batch at the next step through its `Cancel` token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..runtime.batching import EditOutcome
from .forecast import Forecast

if TYPE_CHECKING:
    from PIL import Image

    from ..runtime import Step1XEditRuntime
    from ..runtime.batching import BatchKey, EditJob

log = logging.getLogger("step1x_export.serve")
# Edits per batch when the server is not told: on 2 CPU cores the toy model's step costs an edit least at 4
# and its throughput gains nothing more at 8 (docs/serving.md); on a GPU a 1024^2 edit at batch 2 (CFG)
# already fills much of the device.
DEFAULT_MAX_BATCH = 4


@dataclass(eq=False)
class SoloJob:
    """Work that runs alone on the runtime, in its turn in the line (a reasoned edit, a text-to-image one):
    `run(runtime)` returns its image or raises; `result` keeps whatever else it made for the response."""

    run: Callable[[Step1XEditRuntime], Image.Image]
    tag: object = None
    result: object = None

    def key(self) -> BatchKey:
        return (0, id(self))  # no edit size is 0 wide: nothing batches with it


class QueueFull(Exception):
    """Refused at admission: `code` is queue_full (the line is at its length limit) or past_deadline."""

    def __init__(self, code: str, message: str, retry_after_s: int):
        super().__init__(message)
        self.code, self.retry_after_s = code, retry_after_s


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


@dataclass(eq=False)
class Ticket:
    """One admitted edit, from arrival to its outcome."""

    job: EditJob | SoloJob
    key: BatchKey
    cancel: Cancel
    future: asyncio.Future[EditOutcome]
    loop: asyncio.AbstractEventLoop
    steps_left: int
    arrived: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when it joined a batch

    def resolve(self, outcome: EditOutcome) -> None:
        def set_result() -> None:
            if not self.future.done():
                self.future.set_result(outcome)

        self.loop.call_soon_threadsafe(set_result)


class EditBatcher:
    """Waiting edits, admission by deadline, and the worker thread that runs them in batches."""

    def __init__(self, max_batch: int, max_queue: int, *, refuse_late: bool = True, adaptive: bool = True):
        self.max_batch, self.max_queue, self.refuse_late = max_batch, max_queue, refuse_late
        self.forecast = Forecast(max_batch, adaptive=adaptive)
        self.runtime: Step1XEditRuntime | None = None
        self._waiting: deque[Ticket] = deque()
        self._running: set[Ticket] = set()
        self._lock = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self, runtime: Step1XEditRuntime) -> None:
        self.runtime = runtime
        self._worker = threading.Thread(target=self._work, name="step1x-edit", daemon=True)
        self._worker.start()

    # -- the event loop's side ------------------------------------------------------------------------------
    def admit(self, job: EditJob | SoloJob, key: BatchKey, steps: int, cancel: Cancel, deadline_s: float) -> Ticket:
        """Queue the edit if it is predicted to finish within `deadline_s`; else QueueFull (503)."""
        with self._lock:
            if self.waiting >= self.max_queue + max(0, self.max_batch - self.running):  # free places: no wait
                raise QueueFull("queue_full", f"{self.waiting} edits already wait (the limit is {self.max_queue})",
                                self._retry_after(steps))
            work = sum(t.steps_left for t in self._running) + sum(t.steps_left for t in self._waiting)
            edits = self.running + self.waiting
            predicted = self.forecast.completion_s(work, edits, steps)
            if self.refuse_late and predicted > deadline_s:
                raise QueueFull("past_deadline", f"the edit would finish in about {predicted:.1f} s, past its "
                                f"deadline of {deadline_s:.1f} s", self._retry_after(steps, work, edits))
            loop = asyncio.get_running_loop()
            ticket = job.tag = Ticket(job, key, cancel, loop.create_future(), loop, steps)
            self._waiting.append(ticket)
            self._lock.notify()
        return ticket

    def _retry_after(self, steps: int, work: int | None = None, edits: int | None = None) -> int:
        if work is None:
            work = sum(t.steps_left for t in self._running) + sum(t.steps_left for t in self._waiting)
            edits = self.running + self.waiting
        return self.forecast.retry_after_s(work, edits or 0, steps)

    async def outcome(self, ticket: Ticket) -> EditOutcome:
        """Wait for the edit; cancelled while waiting it leaves the line, running it leaves its batch."""
        try:
            return await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            ticket.cancel.set("cancelled")
            with self._lock:
                queued = ticket in self._waiting
                if queued:
                    self._waiting.remove(ticket)
            if not queued:
                await asyncio.wait([ticket.future])  # it stops at its next step; its place is free then
            raise

    def close(self) -> None:
        """Stop taking edits; the worker finishes every admitted one, then ends."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()

    # -- the worker thread ----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
            assert self.runtime is not None
            with self._lock:  # adaptive: the batch size that measured fastest, up to max_batch
                limit = self.forecast.batch_limit()
            first = self._take(limit, None)
            if not first:
                continue
            if isinstance(first[0].job, SoloJob):
                self._run_solo(first[0])
                continue
            try:
                self.runtime.edit_batch([t.job for t in first], join=self._join, done=self._done,  # type: ignore[misc]
                                         max_batch=limit)
            except Exception as e:  # a fault outside any one edit: fail the batch's edits, keep serving
                log.exception("a batch of edits failed")
                with self._lock:
                    stranded, self._running = list(self._running), set()
                for ticket in stranded:
                    ticket.resolve(EditOutcome(ticket.job, error=e))

    def _take(self, room: int, key: BatchKey | None) -> list[Ticket]:
        """Up to `room` waiting edits from the head of the line with the batch's key (the head's if None)."""
        taken: list[Ticket] = []
        with self._lock:
            while self._waiting and len(taken) < room:
                head = self._waiting[0]
                if head.cancel.is_set:  # left while waiting: the runtime never sees it
                    self._waiting.popleft()
                    continue
                key = head.key if key is None else key
                if head.key != key:
                    break
                self._waiting.popleft()
                head.started = time.perf_counter()
                self._running.add(head)
                taken.append(head)
        return taken

    def _join(self, room: int, key: BatchKey) -> list[EditJob]:
        return [t.job for t in self._take(room, key)]  # type: ignore[misc]  # solo keys match no batch

    def _run_solo(self, ticket: Ticket) -> None:
        job: SoloJob = ticket.job  # type: ignore[assignment]
        outcome = EditOutcome(job)  # type: ignore[arg-type]
        try:
            outcome.image = job.run(self.runtime)  # type: ignore[arg-type]
            outcome.timings = dict(self.runtime.timings)  # type: ignore[union-attr]  # its (last) edit's stages
        except Exception as e:  # its own failure: the client's answer
            outcome.error = e
        with self._lock:
            self._running.discard(ticket)
        ticket.resolve(outcome)

    def _done(self, outcome: EditOutcome) -> None:
        ticket: Ticket = outcome.job.tag  # type: ignore[assignment]
        with self._lock:  # admission reads the forecast from the event loop's thread
            if outcome.error is None:
                self.forecast.observe(outcome)
            self._running.discard(ticket)
        ticket.resolve(outcome)
