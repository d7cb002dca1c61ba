"""A request's edit bounded by its deadline and its client: stopped when either runs out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from .queue import Cancel
from .request import RequestError

Receive = Callable[[], Awaitable[dict[str, Any]]]
T = TypeVar("T")


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client goes away (after the body has been read, receive only reports that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def guarded(work: Awaitable[T], request: Request, cancel: Cancel, timeout_s: float) -> T:
    """Run `work` until it ends, the deadline passes (504) or the client disconnects (its slot is freed)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(timeout_s, 0), return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        cancel.set("client disconnected" if gone in done else "deadline passed")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RequestError):
            await task
        if gone in done:
            raise RequestError(499, "client_gone", "the client disconnected; the edit was stopped")
        raise RequestError(504, "timeout", "the edit did not finish within the request's time limit")
    except asyncio.CancelledError:  # the server (e.g. Ray Serve on a disconnect) cancelled this request
        cancel.set("request cancelled")
        task.cancel()
        raise
    finally:
        gone.cancel()
