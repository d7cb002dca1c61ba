"""The HTTP API over an `EditService` (a Starlette ASGI app; uvicorn serves it, or Ray Serve's ingress).

    POST /v1/edits   multipart: image, instruction, [seed, steps, cfg, size_level, negative_prompt, timeout_s]
                     -> image/png (X-Seed, X-Model, X-Timings, Server-Timing headers),
                        or JSON with the PNG in base64 when the client sends `Accept: application/json`
    GET  /healthz    alive;  GET /readyz: loaded and warm;  GET /metrics: Prometheus text
    GET  /v1/model   the model's identity and the server's limits;  GET /: the web page

Every error is `{"error": code, "message": text}` with a fitting status; never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .queue import Cancel
from .request import FIELDS, EditRequest, ParamRules, RequestError, decode_image, parse_params
from .service import EditResult, EditService

log = logging.getLogger("step1x_export.serve")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length or, streamed, as it arrives."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(self._too_large(int(length)))(scope, receive, send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._too_large(seen)
            return message

        await self.app(scope, counted, send)

    def _too_large(self, size: int) -> RequestError:
        return RequestError(413, "body_too_large", f"the request body is over {self.max_bytes} bytes (got {size}+)")


def error_response(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_edit_request(request: Request, rules: ParamRules) -> EditRequest:
    """Parse and check the multipart form; every mistake is a RequestError naming the field."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "bad_request", "send multipart/form-data with an image file and an instruction")
    try:
        form = await request.form(max_files=1, max_fields=len(FIELDS))
    except MultiPartException as e:
        raise RequestError(400, "bad_request", f"malformed form: {e.message}") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "bad_request", "the form lacks an image file in the field 'image'")
    fields = {k: v for k, v in form.multi_items() if k != "image"}
    params = parse_params(fields, rules)
    image, notes = decode_image(await upload.read(), rules.max_pixels, upload.filename or "image")
    await form.close()
    return EditRequest(image, params, notes)


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client goes away (after the body has been read, receive only reports that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def guarded(work: Awaitable[EditResult], request: Request, cancel: Cancel, timeout_s: float) -> EditResult:
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


def edit_response(result: EditResult, model: dict[str, str | None], as_json: bool) -> Response:
    timings = {k: round(v, 4) for k, v in result.timings.items()}
    meta = {"seed": result.params.seed, "params": result.params.as_dict(), "width": result.width,
            "height": result.height, "model": model, "timings": timings, "warnings": result.warnings}
    if as_json:
        return JSONResponse({**meta, "image_png_base64": base64.b64encode(result.png).decode()})
    headers = {
        "X-Seed": str(result.params.seed),
        "X-Model": json.dumps(model, separators=(",", ":")),
        "X-Timings": json.dumps(timings, separators=(",", ":")),
        "Server-Timing": ", ".join(f"{k.replace(' ', '_')};dur={v * 1000:.1f}" for k, v in result.timings.items()),
    }
    if result.warnings:
        # A header is Latin-1: an instruction in Chinese is sent escaped (the JSON answer has it as written).
        headers["X-Warnings"] = "; ".join(result.warnings).encode("ascii", "backslashreplace").decode()[:1000]
    return Response(result.png, media_type="image/png", headers=headers)


def create_app(service: EditService, *, load_on_startup: bool = True) -> Any:
    """The ASGI app over `service`; `load_on_startup` loads the model in the background at startup."""

    async def post_edit(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            rules = service.check_ready()
            edit_request = await asyncio.wait_for(read_edit_request(request, rules), service.limits.timeout_s)
            deadline = edit_request.params.timeout_s or service.limits.timeout_s
            cancel = Cancel()
            left = deadline - (time.perf_counter() - t0)
            result = await guarded(service.edit(edit_request, cancel, left), request, cancel, left)
            response = edit_response(result, service.model, "application/json" in request.headers.get("accept", ""))
        except RequestError as e:
            service.metrics.errors.labels(e.code).inc()
            response = error_response(e)
        except TimeoutError:
            service.metrics.errors.labels("timeout").inc()
            response = error_response(RequestError(504, "timeout", "the upload did not arrive within the time limit"))
        except Exception:  # a server fault: logged with its traceback here, a one-line JSON for the client
            log.exception("edit request failed")
            service.metrics.errors.labels("internal").inc()
            response = error_response(RequestError(500, "internal", "the edit failed inside the server; see its log"))
        service.metrics.requests.labels(str(response.status_code)).inc()
        service.metrics.latency.observe(time.perf_counter() - t0)
        return response

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive", "state": service.state})

    async def readyz(request: Request) -> Response:
        ready = service.state == "ready"
        body = {"ready": ready, "state": service.state, **({"error": service.error} if service.error else {})}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    async def model(request: Request) -> Response:
        rules = service.rules.__dict__ if service.rules is not None else None
        return JSONResponse({"model": service.model, "state": service.state, "params": rules,
                             "limits": service.limits.as_dict()})

    async def page(request: Request) -> Response:
        return HTMLResponse(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": "http", "message": exc.detail}, status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if load_on_startup:
            service.start_loading()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    routes = [
        Route("/", page), Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
        Route("/v1/model", model), Route("/v1/edits", post_edit, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    return BodyLimit(app, service.limits.max_upload_bytes)
