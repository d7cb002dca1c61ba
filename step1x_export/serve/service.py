"""`EditService`: one runtime behind a bounded queue, with readiness, metrics and the server's limits.

It knows nothing of HTTP: the Starlette app (and so the Ray replicas, which run the same app) translate
requests into `EditRequest`s and `RequestError`s into status codes.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from ..validate import NonFiniteError
from .metrics import ServeMetrics
from .queue import Cancel, EditCancelled, EditQueue, QueueFull
from .request import EditParams, EditRequest, ParamRules, RequestError
from .spec import RuntimeSpec, ServeLimits

if TYPE_CHECKING:
    from ..runtime import Step1XEditRuntime

log = logging.getLogger("step1x_export.serve")
NOT_READY_RETRY_S = 5
WARMUP_STEPS = 2


@dataclass
class EditResult:
    png: bytes
    width: int
    height: int
    params: EditParams
    timings: dict[str, float]  # runtime stages, then queue and total, in seconds
    warnings: list[str] = field(default_factory=list)


class EditService:
    """Loads the runtime (in a background thread, or inline), warms it, and runs edits one at a time."""

    def __init__(self, spec: RuntimeSpec, limits: ServeLimits, *, replica: str | None = None):
        self.spec, self.limits = spec, limits
        self.replica = replica or f"{os.uname().nodename}:{os.getpid()}"
        self.state = "loading"  # loading -> warming -> ready | failed; closed at shutdown
        self.error = ""
        self.runtime: Step1XEditRuntime | None = None
        self.rules: ParamRules | None = None
        self.model: dict[str, str | None] = dict(spec.identity())
        self.queue = EditQueue(limits.max_queue)
        self.metrics = ServeMetrics(lambda: self.queue.waiting, lambda: self.queue.running)

    # -- lifetime -------------------------------------------------------------------------------
    def load(self) -> None:
        """Build the runtime and run one warm-up edit; on failure the service stays up and says why."""
        try:
            t0 = time.perf_counter()
            self.runtime = self.spec.load()
            self.rules = self._rules(self.runtime)
            opts = self.runtime.options
            self.model |= {"config": self.runtime.config.name, "device": str(self.runtime.device),
                           "precision": opts.precision.value, "replica": self.replica}
            if self.limits.warmup:
                self.state = "warming"
                self._warm_up(self.runtime, self.rules)
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info("model %s ready in %.1f s", self.model, time.perf_counter() - t0)
        except Exception as e:  # any load failure: /readyz reports it, edits get 503
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.exception("loading the model failed")

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="step1x-load", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.state = "closed"
        self.metrics.ready.set(0)
        self.queue.close(wait=True)  # a running edit finishes first
        if self.runtime is not None:
            self.runtime.close()

    def _rules(self, runtime: Step1XEditRuntime) -> ParamRules:
        from ..specs import profile_for

        profile = profile_for(runtime.config)
        top = self.limits.max_size_level or profile.max_level
        default = min(self.limits.default_size_level or profile.max_level, top)
        return ParamRules(max_steps=self.limits.max_steps, min_size_level=16, max_size_level=top,
                          default_size_level=default, default_steps=runtime.config.default_steps,
                          default_cfg=runtime.config.default_cfg, max_pixels=self.limits.max_pixels,
                          timeout_s=self.limits.timeout_s)

    def _warm_up(self, runtime: Step1XEditRuntime, rules: ParamRules) -> None:
        """One edit at the default size: loads every stage, compiles and captures graphs for that shape."""
        image = Image.new("RGB", (rules.default_size_level,) * 2, (128, 128, 128))
        runtime.edit(image, "warm-up", seed=0, steps=WARMUP_STEPS, size_level=rules.default_size_level)

    # -- edits ----------------------------------------------------------------------------------
    def check_ready(self) -> ParamRules:
        if self.state != "ready" or self.rules is None:
            why = f"the model failed to load ({self.error})" if self.state == "failed" else f"the model is {self.state}"
            raise RequestError(503, "not_ready", why, retry_after=NOT_READY_RETRY_S)
        return self.rules

    async def edit(self, request: EditRequest, cancel: Cancel) -> EditResult:
        """Queue and run one edit; QueueFull becomes 503 + Retry-After, a runtime refusal 400."""
        self.check_ready()
        t0 = time.perf_counter()
        try:
            admitted = await self.queue.run(lambda c: self._run(request, c), cancel)
        except QueueFull as e:
            raise RequestError(503, "queue_full", str(e), retry_after=e.retry_after_s) from None
        except EditCancelled as e:
            raise RequestError(499, "cancelled", f"the edit was cancelled ({e})") from None
        except NonFiniteError as e:  # the model, not the request, went wrong
            raise RequestError(500, "non_finite", str(e)) from None
        except ValueError as e:  # the runtime refused the input (e.g. a size outside an engine's profile)
            raise RequestError(400, "bad_request", str(e)) from None
        result = admitted.value
        result.timings |= {"queue": admitted.queued_s, "total": time.perf_counter() - t0}
        self.metrics.queued.observe(admitted.queued_s)
        for stage, seconds in result.timings.items():
            if stage not in ("queue", "total"):
                self.metrics.stage.labels(stage).inc(seconds)
        return result

    def _run(self, request: EditRequest, cancel: Cancel) -> EditResult:
        """In the worker thread: the edit, stopped between denoising steps once `cancel` is set."""
        assert self.runtime is not None
        cancel.check()
        p = request.params

        def progress(done: int, total: int) -> None:
            self.metrics.dit_steps.inc()
            cancel.check()

        out = self.runtime.edit(request.image, p.instruction, seed=p.seed, steps=p.steps, cfg=p.cfg,
                                size_level=p.size_level, negative_prompt=p.negative_prompt, progress=progress)
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        return EditResult(buf.getvalue(), out.width, out.height, p, dict(self.runtime.timings), request.warnings)
