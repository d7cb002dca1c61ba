"""The HTTP API over an `EditService` (a Starlette ASGI app; uvicorn serves it, or Ray Serve's ingress).

    POST /v1/edits   multipart: image, instruction, [seed, steps, cfg, size_level, negative_prompt, timeout_s]
                     -> image/png (X-Seed, X-Model, X-Timings, Server-Timing headers),
                        or JSON with the PNG in base64 when the client sends `Accept: application/json`
    GET  /healthz    alive;  GET /readyz: loaded and warm;  GET /metrics: Prometheus text
    GET  /v1/model   the model's identity and the server's limits;  GET /: the web page
    POST /v1/edits with stream=true: server-sent events (progress, previews, then the result)
    POST /v1/images/edits, /v1/images/generations, GET /v1/models: OpenAI's images API (openai_api.py)

With API keys (auth.py) every /v1 route needs `Authorization: Bearer <key>`.

Every error is `{"error": code, "message": text}` (OpenAI's shape on its routes and for keys) with a fitting
status; never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .auth import KeyGate, KeyPolicy
from .guard import guarded
from .openai_api import OpenAIImages
from .preview import Projection
from .progress import ProgressFeed
from .queue import Cancel
from .reasoned import flag_field, parse_reasoning
from .request import FIELDS, EditRequest, ParamRules, RequestError, decode_image, parse_params
from .service import EditResult, EditService, FeedFactory
from .streaming import EditEvents, stream_edit

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


async def read_edit_request(request: Request, rules: ParamRules) -> tuple[EditRequest, dict[str, Any]]:
    """Parse and check the multipart form (and return its text fields); every mistake is a RequestError
    naming the field."""
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
    return EditRequest(image, params, notes), fields


def edit_body(result: EditResult, model: dict[str, str | None]) -> dict[str, Any]:
    """The JSON answer of /v1/edits (also the `result` event of its stream)."""
    timings = {k: round(v, 4) for k, v in result.timings.items()}
    body = {"seed": result.params.seed, "params": result.params.as_dict(), "width": result.width,
            "height": result.height, "model": model, "timings": timings, "warnings": result.warnings,
            "image_png_base64": base64.b64encode(result.png).decode()}
    return body | ({"reasoning": result.reasoning} if result.reasoning is not None else {})


def edit_response(result: EditResult, model: dict[str, str | None], as_json: bool) -> Response:
    if as_json:
        return JSONResponse(edit_body(result, model))
    timings = {k: round(v, 4) for k, v in result.timings.items()}
    headers = {
        "X-Seed": str(result.params.seed),
        "X-Model": json.dumps(model, separators=(",", ":")),
        "X-Timings": json.dumps(timings, separators=(",", ":")),
        "Server-Timing": ", ".join(f"{k.replace(' ', '_')};dur={v * 1000:.1f}" for k, v in result.timings.items()),
    }
    if result.warnings:
        # A header is Latin-1: an instruction in Chinese is sent escaped (the JSON answer has it as written).
        headers["X-Warnings"] = "; ".join(result.warnings).encode("ascii", "backslashreplace").decode()[:1000]
    if result.reasoning is not None:  # the instruction the edits started from; the rest needs the JSON answer
        headers["X-Instruction"] = json.dumps(result.reasoning["instruction"])
    return Response(result.png, media_type="image/png", headers=headers)


def wants_stream(request: Request, fields: dict[str, Any]) -> bool:
    return flag_field(fields, "stream") or "text/event-stream" in request.headers.get("accept", "")


def create_app(service: EditService, *, load_on_startup: bool = True, keys: KeyPolicy | None = None) -> Any:
    """The ASGI app over `service`; `load_on_startup` loads the model in the background at startup; `keys`
    (when it holds any) guards the /v1 routes."""
    feeds = ProgressFeeds(service)
    images = OpenAIImages(service, feeds.factory)
    keys = replace(keys or KeyPolicy(), retry_after_s=lambda: one_edit_s(service))

    async def post_edit(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            rules = service.check_ready()
            edit_request, fields = await asyncio.wait_for(read_edit_request(request, rules), service.limits.timeout_s)
            reasoning = parse_reasoning(fields)
            deadline = edit_request.params.timeout_s or service.limits.timeout_s
            cancel = Cancel()
            left = deadline - (time.perf_counter() - t0)
            if wants_stream(request, fields):
                def run(feed: FeedFactory) -> Any:
                    return service.edit(edit_request, cancel, left, feed=feed, reasoning=reasoning)

                wire = EditEvents(lambda result: edit_body(result, service.model))
                response = await stream_edit(run, feeds.factory(None), wire, cancel, left, error_response)
                service.metrics.requests.labels(str(response.status_code)).inc()
                return response
            result = await guarded(service.edit(edit_request, cancel, left, reasoning=reasoning), request, cancel,
                                   left)
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
        Route("/v1/models", images.models), Route("/v1/images/edits", images.edits, methods=["POST"]),
        Route("/v1/images/generations", images.generations, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    return KeyGate(BodyLimit(app, service.limits.max_upload_bytes), keys)


def one_edit_s(service: EditService) -> int:
    """About one edit's seconds at the default steps (a 429's Retry-After: a key's slot frees that soon)."""
    steps = service.rules.default_steps if service.rules is not None else 1
    return math.ceil(service.eta_s(steps))


class ProgressFeeds:
    """Makes each streamed request's progress feed, with the served model's preview map (if it has one)."""

    def __init__(self, service: EditService):
        self.service = service
        self._projection: tuple[Projection | None] | None = None

    def projection(self) -> Projection | None:
        if self._projection is None:  # once the model is known (it loads in the background)
            self._projection = (Projection.for_model(str(self.service.model.get("config"))),)
        return self._projection[0]

    def factory(self, previews: int | None) -> FeedFactory:
        """Feeds with `previews` previews (None: one per step)."""
        return lambda total, size: ProgressFeed(total, size=size, projection=self.projection(), previews=previews)
