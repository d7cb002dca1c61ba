"""Streamed answers (server-sent events): the edit's progress while it runs, then its result or its error.

Both APIs stream through `stream_edit`; each says how a report, the result and an error read on its wire
(`/v1/edits`: progress / preview / result / error events; the OpenAI route: its partial_image and completed
events). A client that goes away ends the stream, and its edit stops at the next step as with any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from starlette.responses import Response, StreamingResponse

from .progress import ProgressFeed, Report, report_dict, sse
from .queue import Cancel
from .request import RequestError
from .service import EditResult, FeedFactory

log = logging.getLogger("step1x_export.serve")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy holds the events back


class StreamWire(Protocol):
    def report(self, report: Report) -> bytes | None: ...
    def result(self, result: EditResult) -> bytes: ...
    def error(self, error: RequestError) -> bytes: ...


class EditEvents:
    """`/v1/edits` streamed: `progress` {step, total, eta_s, elapsed_s}, `preview` {step, total, index,
    preview_png_base64}, then `result` (the JSON answer) or `error` ({error, message})."""

    def __init__(self, result_body: Callable[[EditResult], dict]):
        self.result_body = result_body

    def report(self, report: Report) -> bytes:
        return sse("preview" if hasattr(report, "png") else "progress", report_dict(report))

    def result(self, result: EditResult) -> bytes:
        return sse("result", self.result_body(result))

    def error(self, error: RequestError) -> bytes:
        return sse("error", error.body())


async def stream_edit(run: Callable[[FeedFactory], Awaitable[EditResult]], make_feed: FeedFactory, wire: StreamWire,
                      cancel: Cancel, timeout_s: float, refuse: Callable[[RequestError], Response]) -> Response:
    """Run `run(feed_factory)`; once the edit is admitted, answer a stream of its reports and then its result,
    as `wire` writes them. Refused or failed before that: `refuse(error)`, a plain answer with its status
    (and Retry-After), as without streaming."""
    made: asyncio.Future[ProgressFeed] = asyncio.get_running_loop().create_future()

    def feed(total: int, size: tuple[int, int]) -> ProgressFeed:
        live = make_feed(total, size)
        made.set_result(live)
        return live

    task = asyncio.ensure_future(asyncio.wait_for(run(feed), timeout_s))

    async def admitted() -> None:
        await (await made).admitted

    waiting = asyncio.ensure_future(admitted())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():  # the edit ended before it was admitted: refused (or the server failed)
        waiting.cancel()
        try:
            task.result()
        except RequestError as e:
            return refuse(e)
        except TimeoutError:
            return refuse(RequestError(504, "timeout", "the edit did not finish within the request's time limit"))
        except Exception:
            log.exception("streamed edit failed")
            return refuse(RequestError(500, "internal", "the edit failed inside the server; see its log"))
    return StreamingResponse(events(task, made.result(), wire, cancel), media_type="text/event-stream",
                             headers=STREAM_HEADERS)


async def events(task: asyncio.Future[EditResult], live: ProgressFeed, wire: StreamWire,
                 cancel: Cancel) -> AsyncIterator[bytes]:
    """The admitted edit's reports as they come, then its result or its error."""
    try:
        async for report in live.reports():
            if (chunk := wire.report(report)) is not None:
                yield chunk
        yield wire.result(await task)
    except RequestError as e:
        yield wire.error(e)
    except TimeoutError:
        yield wire.error(RequestError(504, "timeout", "the edit did not finish within the request's time limit"))
    except Exception:  # a server fault: logged here, one line for the client
        log.exception("streamed edit failed")
        yield wire.error(RequestError(500, "internal", "the edit failed inside the server; see its log"))
    finally:  # the client left (the generator is closed) or the edit ended: stop it if it still runs
        if not task.done():
            cancel.set("client disconnected")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
