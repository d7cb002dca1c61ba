"""Live progress of one request: its steps, an ETA and previews, from the worker thread to the response stream.

The edit's callbacks run on the worker thread between denoising steps; they only hand small records to the
request's event loop (`call_soon_threadsafe`), so a slow client never holds up the batch. A stream that is
not read holds at most one record per step of its edit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .preview import Projection

log = logging.getLogger("step1x_export.serve")


@dataclass(frozen=True)
class StepReport:
    """After a denoising step: steps done and in all (every round of a reasoned edit), seconds to go."""

    step: int
    total: int
    eta_s: float
    elapsed_s: float


@dataclass(frozen=True)
class PreviewReport:
    """A preview PNG (1/8 of the edit size) after step `step` of `total`; `index` counts previews from 0."""

    step: int
    total: int
    index: int
    png: bytes


Report = StepReport | PreviewReport


def preview_steps(total: int, count: int | None) -> set[int]:
    """The steps after which a preview is made: every step (`count` None), or `count` evenly spaced ones
    before the last (the last step's picture is the result itself)."""
    if count is None:
        return set(range(1, total + 1))
    return {max(1, round(total * (i + 1) / (count + 1))) for i in range(count)} if total > 1 else set()


class StepCounter:
    """Steps done over every edit of a request (a reasoned edit runs up to `edits`), from each edit's own count."""

    def __init__(self, steps_per_edit: int, edits: int):
        self.steps_per_edit, self.total = steps_per_edit, steps_per_edit * edits
        self.edits_done = 0
        self.step = 0

    def advance(self, done: int, total: int) -> int:
        """Record that the current edit finished step `done` of `total`; returns the steps left in all."""
        self.step = self.edits_done * self.steps_per_edit + done
        if done == total:
            self.edits_done += 1
        return self.total - self.step


class ProgressFeed:
    """One request's reports: `on_step` and `on_latents` are called on the worker thread, `reports()` is read
    by the response on the event loop. `previews`: how many previews (None: one per step, 0: none)."""

    def __init__(self, total: int, *, size: tuple[int, int], projection: Projection | None,
                 previews: int | None = None):
        self.loop = asyncio.get_running_loop()
        self.total, self.size, self.projection = total, size, projection
        self.at = preview_steps(total, previews) if projection is not None and previews != 0 else set()
        self.t0 = time.perf_counter()
        self._tapped = 0  # latents seen, over every edit of the request
        self._sent = 0
        self._queue: asyncio.Queue[Report | None] = asyncio.Queue()
        self.admitted: asyncio.Future[None] = self.loop.create_future()  # set once the edit is in the line

    def mark_admitted(self) -> None:
        if not self.admitted.done():
            self.admitted.set_result(None)

    @property
    def wants_latents(self) -> bool:
        return bool(self.at)

    def on_step(self, step: int, eta_s: float) -> None:
        self._put(StepReport(step, self.total, round(eta_s, 3), round(time.perf_counter() - self.t0, 3)))

    def on_latents(self, tokens: torch.Tensor) -> None:
        self._tapped += 1
        if self._tapped not in self.at or self.projection is None:
            return
        try:
            png = self.projection.png(tokens, *self.size)
        except Exception:  # a preview must never stop the edit: this request gets no more of them
            log.exception("making a preview failed; the edit goes on without previews")
            self.at = set()
            return
        self._put(PreviewReport(self._tapped, self.total, self._sent, png))
        self._sent += 1

    def close(self) -> None:
        """No more reports (the edit ended, one way or another)."""
        self.loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def _put(self, report: Report) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, report)

    async def reports(self) -> AsyncIterator[Report]:
        while (report := await self._queue.get()) is not None:
            yield report


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def report_dict(report: Report) -> dict[str, Any]:
    import base64

    if isinstance(report, PreviewReport):
        return {"step": report.step, "total": report.total, "index": report.index,
                "preview_png_base64": base64.b64encode(report.png).decode()}
    return asdict(report)
