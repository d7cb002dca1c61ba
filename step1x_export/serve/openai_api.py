"""OpenAI's images API over the same service: what clients and tools (the `openai` SDK, ...) already speak.

    POST /v1/images/edits        multipart: image, prompt, [n, size, response_format, model, stream, partial_images]
    POST /v1/images/generations  JSON: prompt, [n, size, response_format, model, stream, partial_images]
    GET  /v1/models              the one model served

Step1X's own parameters ride as extra fields (the SDK's `extra_body`): seed, steps, cfg, negative_prompt,
size_level, timeout_s, and on a v1.2 model think, reflect and judge_retries (the rewritten instruction comes back as
`revised_prompt`, every round and the judge's texts under `step1x.reasoning`). Images come back as
`b64_json` PNGs (there is no file hosting for `url`); an edit keeps its input's size. `stream` answers with
OpenAI's events (`image_edit.partial_image` / `image_generation.partial_image`, then `.completed`): up to
`partial_images` previews, each also carrying the step, the steps in all and an ETA. Errors have OpenAI's
shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .auth import openai_error
from .guard import guarded
from .progress import PreviewReport, Report
from .queue import Cancel
from .reasoned import Reasoning, flag_field, parse_reasoning
from .request import EditParams, EditRequest, ParamRules, RequestError, decode_image, parse_params
from .service import EditResult, EditService, FeedFactory
from .streaming import stream_edit

MAX_N = 10  # images per request, as OpenAI's
MAX_PARTIAL_IMAGES = 8
STEP1X_FIELDS = ("seed", "steps", "cfg", "negative_prompt", "size_level", "timeout_s")
REASONING_FIELDS = ("think", "reflect", "judge_retries")
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "stream", "partial_images", "output_format")
# OpenAI's fields that ask for nothing this model does differently: accepted and left alone.
IGNORED = ("user", "quality", "background", "moderation", "style", "input_fidelity", "output_compression",
           "safety_identifier")
ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def error_response(e: RequestError) -> JSONResponse:
    kind = ERROR_TYPES.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
    response = openai_error(e.status, e.message, kind, e.code)
    if e.retry_after is not None:
        response.headers["Retry-After"] = str(e.retry_after)
    return response


def bad(message: str, code: str = "bad_request") -> RequestError:
    return RequestError(400, code, message)


def parse_size(raw: str) -> tuple[int, int] | None:
    """'WxH' -> (W, H); 'auto' or empty -> None."""
    text = raw.strip().lower()
    if text in ("", "auto"):
        return None
    w, sep, h = text.partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise bad(f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {raw!r}")
    return int(w), int(h)


def common_fields(form: Mapping[str, Any], model_id: str) -> tuple[int, bool, int, Reasoning | None]:
    """n, stream, partial_images and the reasoning of a request; every OpenAI field it cannot honour is a 400."""
    unknown = sorted(set(form) - {*OPENAI_FIELDS, *STEP1X_FIELDS, *REASONING_FIELDS, *IGNORED, "image", "image[]"})
    if unknown:
        raise bad(f"unknown field(s) {unknown}; Step1X's own are {', '.join(STEP1X_FIELDS + REASONING_FIELDS)}")
    if "mask" in form:
        raise bad("mask is not supported: Step1X edits the whole picture as the prompt says")
    if str(form.get("response_format") or "b64_json") != "b64_json":
        raise bad("response_format must be b64_json (this server hosts no image URLs)")
    if str(form.get("output_format") or "png") != "png":
        raise bad("output_format must be png")
    model = str(form.get("model") or model_id)
    if model != model_id:
        raise RequestError(404, "model_not_found", f"the model {model!r} is not served here; this server runs "
                           f"{model_id!r} (GET /v1/models)")
    n = _int(form, "n", 1, MAX_N, 1)
    stream = flag_field(form, "stream")
    if stream and n != 1:
        raise bad("a streamed request makes one image (n = 1)")
    partial = _int(form, "partial_images", 0, MAX_PARTIAL_IMAGES, 0)
    return n, stream, partial, parse_reasoning(form)


def _int(form: Mapping[str, Any], name: str, lo: int, hi: int, default: int) -> int:
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    text = str(raw).strip()
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise bad(f"{name} must be an integer in [{lo}, {hi}], got {text!r}")
    return int(text)


def edit_params(form: Mapping[str, Any], rules: ParamRules) -> EditParams:
    """The prompt and Step1X's extra fields, checked by the same rules as /v1/edits."""
    fields = {k: str(form[k]) for k in STEP1X_FIELDS if form.get(k) is not None}
    if not isinstance(form.get("prompt"), str):
        raise bad("the request lacks a text field 'prompt'")
    return parse_params({"instruction": form["prompt"], **fields}, rules)


def images_body(results: list[EditResult], size: str) -> dict[str, Any]:
    data = []
    for r in results:
        item: dict[str, Any] = {"b64_json": _b64(r.png)}
        if r.reasoning is not None:
            item["revised_prompt"] = r.reasoning["instruction"]
        data.append(item)
    return {"created": int(time.time()), "data": data, "output_format": "png", "size": size,
            "step1x": [step1x_extra(r) for r in results]}


def step1x_extra(r: EditResult) -> dict[str, Any]:
    """What Step1X adds to each image: its seed and parameters, timings, warnings, the reasoning."""
    return {"seed": r.params.seed, "params": r.params.as_dict(), "timings": {k: round(v, 4) for k, v in
            r.timings.items()}, "warnings": r.warnings, "reasoning": r.reasoning}


def _b64(png: bytes) -> str:
    import base64

    return base64.b64encode(png).decode()


class OpenAIEvents:
    """OpenAI's image stream: `<kind>.partial_image` per preview, then `<kind>.completed`; errors as
    {"error": {...}} (which the SDK raises)."""

    def __init__(self, kind: str, size: Callable[[], str]):
        self.kind, self.size = kind, size
        self.last_eta = 0.0

    def _event(self, suffix: str, data: dict[str, Any]) -> bytes:
        from .progress import sse

        base = {"type": f"{self.kind}.{suffix}", "created_at": int(time.time()), "size": self.size(),
                "quality": "auto", "background": "opaque", "output_format": "png"}
        return sse(base["type"], base | data)

    def report(self, report: Report) -> bytes | None:
        if not isinstance(report, PreviewReport):
            self.last_eta = report.eta_s
            return None
        return self._event("partial_image", {"b64_json": _b64(report.png), "partial_image_index": report.index,
                                             "step": report.step, "total_steps": report.total, "eta_s": self.last_eta})

    def result(self, result: EditResult) -> bytes:
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                 "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
        extra = {"revised_prompt": result.reasoning["instruction"]} if result.reasoning else {}
        return self._event("completed", {"b64_json": _b64(result.png), "usage": usage, "step1x": step1x_extra(result),
                                         **extra})

    def error(self, error: RequestError) -> bytes:
        from .progress import sse

        kind = "server_error" if error.status >= 500 else "invalid_request_error"
        return sse("error", {"type": "error", "error": {"message": error.message, "type": kind, "param": None,
                                                        "code": error.code}})


class OpenAIImages:
    """The three routes over `service`; `feed` makes a request's progress feed (previews of `partial` images)."""

    def __init__(self, service: EditService, make_feed: Callable[[int | None], FeedFactory]):
        self.service, self.make_feed = service, make_feed
        self.created = int(time.time())

    @property
    def model_id(self) -> str:
        return str(self.service.model.get("config") or self.service.model["source"])

    async def models(self, request: Request) -> Response:
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "step1x-export"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def edits(self, request: Request) -> Response:
        return await self._counted(self._edits(request))

    async def generations(self, request: Request) -> Response:
        return await self._counted(self._generations(request))

    async def _counted(self, answer: Awaitable[Response]) -> Response:
        """The answer, counted in /metrics as /v1/edits' are (a stream: when it starts)."""
        t0 = time.perf_counter()
        response = await answer
        self.service.metrics.requests.labels(str(response.status_code)).inc()
        self.service.metrics.latency.observe(time.perf_counter() - t0)
        return response

    async def _edits(self, request: Request) -> Response:
        try:
            rules = self.service.check_ready()
            if not request.headers.get("content-type", "").startswith("multipart/form-data"):
                raise bad("send multipart/form-data with an image file and a prompt")
            try:
                form = await request.form(max_files=1, max_fields=64)
            except MultiPartException as e:
                raise bad(f"malformed form: {e.message}") from None
            upload = form.get("image") or form.get("image[]")
            if not isinstance(upload, UploadFile):
                raise bad("the form lacks an image file in the field 'image' (one image per edit)")
            fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]")}
            n, stream, partial, reasoning = common_fields(fields, self.model_id)
            params = edit_params(fields, rules)
            image, notes = decode_image(await upload.read(), rules.max_pixels, upload.filename or "image")
            await form.close()
            wanted = parse_size(str(fields.get("size") or ""))
            if wanted is not None and wanted != image.size:
                raise bad(f"size: an edit keeps its input's size ({image.width}x{image.height}); send auto or that")
            size = f"{image.width}x{image.height}"
            edit = EditRequest(image, params, notes)
            return await self._answer(request, "image_edit", [edit], n, stream, partial, reasoning, None, size)
        except RequestError as e:
            return self._refused(e)

    async def _generations(self, request: Request) -> Response:
        try:
            rules = self.service.check_ready()
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                raise bad("send a JSON object with a prompt") from None
            if not isinstance(body, dict):
                raise bad("send a JSON object with a prompt")
            fields = {k: (json.dumps(v) if isinstance(v, bool) else v) for k, v in body.items() if v is not None}
            n, stream, partial, reasoning = common_fields(fields, self.model_id)
            if reasoning is not None:
                raise bad("think and reflect edit a picture: use /v1/images/edits")
            params = edit_params(fields, rules)
            side = rules.default_size_level
            width, height = parse_size(str(fields.get("size") or "")) or (side, side)
            edit = EditRequest(None, params, [])  # type: ignore[arg-type]  # no picture: text-to-image
            return await self._answer(request, "image_generation", [edit], n, stream, partial, None, (width, height),
                                      f"{width}x{height}")
        except RequestError as e:
            return self._refused(e)

    def _refused(self, e: RequestError) -> Response:
        self.service.metrics.errors.labels(e.code).inc()
        return error_response(e)

    async def _answer(self, request: Request, kind: str, edits: list[EditRequest], n: int, stream: bool,
                      partial: int, reasoning: Reasoning | None, size: tuple[int, int] | None,
                      size_text: str) -> Response:
        """Run n images (seeds seed, seed + 1, ... when a seed was given) and answer them, or stream one."""
        base = edits[0]
        requests = [base] + [EditRequest(base.image, replace(base.params, seed=base.params.seed + i), base.warnings)
                             for i in range(1, n)]
        deadline = base.params.timeout_s or self.service.limits.timeout_s
        cancel = Cancel()
        if stream:
            def run(feed: FeedFactory) -> Any:
                return self.service.edit(base, cancel, deadline, feed=feed, reasoning=reasoning, size=size)

            wire = OpenAIEvents(kind, lambda: size_text)
            return await stream_edit(run, self.make_feed(partial), wire, cancel, deadline, error_response)

        async def all_images() -> list[EditResult]:
            return await asyncio.gather(*(self.service.edit(r, cancel, deadline, reasoning=reasoning, size=size)
                                          for r in requests))

        results = await guarded(all_images(), request, cancel, deadline)  # type: ignore[arg-type]
        return JSONResponse(images_body(results, size_text))
