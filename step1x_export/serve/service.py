"""`EditService`: one runtime behind the batcher (admission by deadline), with readiness, metrics and limits.

It knows nothing of HTTP: the Starlette app (and so the Ray replicas, which run the same app) translate
requests into `EditRequest`s and `RequestError`s into status codes.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..runtime.batching import EditJob
from ..validate import NonFiniteError
from .metrics import ServeMetrics
from .progress import ProgressFeed, StepCounter
from .queue import DEFAULT_MAX_BATCH, Cancel, EditBatcher, EditCancelled, QueueFull, SoloJob, Ticket
from .reasoned import Reasoning, reasoning_dict, run_reasoned
from .request import EditParams, EditRequest, ParamRules, RequestError
from .spec import RuntimeSpec, ServeLimits

if TYPE_CHECKING:
    from ..runtime import RuntimeOptions, Step1XEditRuntime
    from ..runtime.batching import BatchKey, EditOutcome, LatentFn
    from ..step1x_ref.sampling import ProgressFn

log = logging.getLogger("step1x_export.serve")
NOT_READY_RETRY_S = 5
FeedFactory = Callable[[int, tuple[int, int]], ProgressFeed]  # (steps in all, edit size) -> the request's feed
WARMUP_STEPS = 2


@dataclass
class EditResult:
    png: bytes
    width: int
    height: int
    params: EditParams
    timings: dict[str, float]  # runtime stages, then queue and total, in seconds
    warnings: list[str] = field(default_factory=list)
    reasoning: dict[str, Any] | None = None  # v1.2's thinking and reflection (reasoned.reasoning_dict)


class EditService:
    """Loads the runtime (in a background thread, or inline), warms it, and runs edits in batches of one size."""

    def __init__(self, spec: RuntimeSpec, limits: ServeLimits, *, replica: str | None = None):
        self.spec, self.limits = spec, limits
        self.replica = replica or f"{os.uname().nodename}:{os.getpid()}"
        self.state = "loading"  # loading -> warming -> ready | failed; closed at shutdown
        self.error = ""
        self.runtime: Step1XEditRuntime | None = None
        self.rules: ParamRules | None = None
        self.model: dict[str, str | None] = dict(spec.identity())
        self.queue = EditBatcher(1, limits.max_queue, refuse_late=limits.refuse_late,  # its batch: set at load
                                 adaptive=limits.adaptive_batch)
        self.metrics = ServeMetrics(lambda: self.queue.waiting, lambda: self.queue.running,
                                    lambda: self.queue.forecast.batch_limit())

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
            max_batch = self._max_batch(self.runtime)
            self.queue.max_batch = self.queue.forecast.max_batch = max_batch
            if self.limits.warmup:
                self.state = "warming"
                self._warm_up(self.runtime, self.rules)
            self.queue.start(self.runtime)
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
        self.queue.close()  # every admitted edit finishes first
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

    def _max_batch(self, runtime: Step1XEditRuntime) -> int:
        """The batch size asked for, else the default where the runtime can batch (else edits one at a time)."""
        asked = self.spec.options.get("max_batch")
        if asked is not None:
            return int(asked)  # the runtime refused at load if it cannot batch
        why = runtime.why_not_batched()
        if why:
            log.info("edits run one at a time: %s", why)
        return 1 if why else DEFAULT_MAX_BATCH

    def _warm_up(self, runtime: Step1XEditRuntime, rules: ParamRules) -> None:
        """One edit at the default size, then batches of them (`warm_batches`), twice: the first pass loads
        every stage, compiles and captures graphs for that shape and every batch the DiT will see; the second
        gives the admission forecast (and the adaptive batch limit) step times without those one-off costs,
        which would otherwise make a batch size look slower than it serves."""
        from ..runtime.batching import EditJob

        image = Image.new("RGB", (rules.default_size_level,) * 2, (128, 128, 128))
        job = EditJob(image, "warm-up", seed=0, steps=WARMUP_STEPS, size_level=rules.default_size_level)
        for measured in (False, True):
            for batch in warm_batches(self.queue.max_batch, runtime.options):
                for outcome in runtime.edit_batch([job] * batch, max_batch=batch):
                    if outcome.error is not None:
                        raise outcome.error
                    if measured:
                        self.queue.forecast.observe(outcome)

    # -- edits ----------------------------------------------------------------------------------
    def check_ready(self) -> ParamRules:
        if self.state != "ready" or self.rules is None:
            why = f"the model failed to load ({self.error})" if self.state == "failed" else f"the model is {self.state}"
            raise RequestError(503, "not_ready", why, retry_after=NOT_READY_RETRY_S)
        return self.rules

    async def edit(self, request: EditRequest, cancel: Cancel, deadline_s: float | None = None, *,
                   feed: FeedFactory | None = None, reasoning: Reasoning | None = None,
                   size: tuple[int, int] | None = None) -> EditResult:
        """Admit (by deadline), batch and run one edit: a refusal is 503 + Retry-After, a runtime refusal 400.

        `reasoning` (v1.2) and text-to-image (`request.image` None, `size` = (width, height)) run alone, counted
        as every edit they may run. `feed(total_steps, (width, height))` gives the request's live progress."""
        self.check_ready()
        assert self.runtime is not None
        t0 = time.perf_counter()
        p = request.params
        counter = StepCounter(p.steps, reasoning.edits if reasoning is not None else 1)
        ticket: Ticket | None = None
        live: ProgressFeed | None = None

        def progress(done: int, total: int) -> None:
            self.metrics.dit_steps.inc()
            left = counter.advance(done, total)
            if ticket is not None:
                ticket.steps_left = left
            if live is not None:
                live.on_step(counter.step, self.eta_s(left))
            cancel.check()

        hooks = JobHooks(progress)
        job, key = self._job(request, reasoning, size, hooks)
        if feed is not None:
            live = feed(counter.total, size or key)
            hooks.latents = live.on_latents if live.wants_latents else None
        if isinstance(job, EditJob):
            job.progress, job.latents = hooks.progress, hooks.latents
        deadline_s = self.limits.timeout_s if deadline_s is None else deadline_s
        try:
            try:
                ticket = self.queue.admit(job, key, counter.total, cancel, deadline_s)
            except QueueFull as e:
                raise RequestError(503, e.code, str(e), retry_after=e.retry_after_s) from None
            if live is not None:
                live.mark_admitted()
            outcome = await self.queue.outcome(ticket)
        finally:
            if live is not None:
                live.close()
        return self._result(outcome, ticket, request, t0)

    def eta_s(self, steps_left: int) -> float:
        """Seconds until an edit with `steps_left` steps to go is answered, at the running batch's step time."""
        forecast = self.queue.forecast
        return steps_left * forecast.step_time(max(1, self.queue.running)) + forecast.overhead_s

    def _job(self, request: EditRequest, reasoning: Reasoning | None, size: tuple[int, int] | None,
             hooks: JobHooks) -> tuple[EditJob | SoloJob, BatchKey]:
        """The queue's job for the request and its batch key (a solo job's own)."""
        assert self.runtime is not None
        p = request.params
        # an instruction the model did not learn, or text-to-image on a model that learned only edits
        request.warnings.extend(self.runtime.instruction_warnings(p.instruction, text_to_image=request.image is None))
        if request.image is None:
            if size is None:
                raise RequestError(400, "bad_request", "text-to-image needs a size (width x height)")
            return self._solo(lambda rt: rt.edit(None, p.instruction, seed=p.seed, steps=p.steps, cfg=p.cfg,
                                                 negative_prompt=p.negative_prompt or None,  # None: text-to-image's
                                                 width=size[0], height=size[1],
                                                 **hooks.kwargs()))
        try:
            key = self.runtime.batch_key(request.image, p.size_level)
        except ValueError as e:
            raise RequestError(400, "bad_request", str(e)) from None
        if reasoning is None:
            return EditJob(request.image, p.instruction, seed=p.seed, steps=p.steps, cfg=p.cfg,
                           size_level=p.size_level, negative_prompt=p.negative_prompt), key
        if not self.runtime.version.reasoning:
            raise RequestError(400, "bad_request", f"think and reflect are v1.2 features; this server runs "
                               f"{self.runtime.config.name} (serve --model tiny-v1.2 or a v1.2 model)")

        image = request.image

        def run(rt: Step1XEditRuntime) -> Image.Image:
            reasoned = run_reasoned(rt, image, p, reasoning, **hooks.kwargs())
            solo.result = reasoning_dict(reasoned)
            return reasoned.image

        solo = SoloJob(run)
        return solo, solo.key()

    @staticmethod
    def _solo(run: Callable[[Step1XEditRuntime], Image.Image]) -> tuple[SoloJob, BatchKey]:
        solo = SoloJob(run)
        return solo, solo.key()

    def _result(self, outcome: EditOutcome, ticket: Ticket, request: EditRequest, t0: float) -> EditResult:
        p = request.params
        error = outcome.error
        if isinstance(error, EditCancelled):
            raise RequestError(499, "cancelled", f"the edit was cancelled ({error})") from None
        if isinstance(error, NonFiniteError):  # the model, not the request, went wrong
            raise RequestError(500, "non_finite", str(error)) from None
        if isinstance(error, ValueError):  # the runtime refused the input (e.g. a size outside an engine's profile)
            raise RequestError(400, "bad_request", str(error)) from None
        if error is not None:
            raise error
        assert outcome.image is not None and ticket.started is not None
        queued_s = ticket.started - ticket.arrived
        buf = io.BytesIO()
        outcome.image.save(buf, format="PNG")
        timings = {**outcome.timings, "queue": queued_s, "total": time.perf_counter() - t0}
        self.metrics.queued.observe(queued_s)
        if outcome.batch_sizes:
            self.metrics.batch.observe(sum(outcome.batch_sizes) / len(outcome.batch_sizes))
        for stage, seconds in outcome.timings.items():
            self.metrics.stage.labels(stage).inc(seconds)
        reasoning = ticket.job.result if isinstance(ticket.job, SoloJob) else None
        return EditResult(buf.getvalue(), outcome.image.width, outcome.image.height, p, timings, request.warnings,
                          reasoning if isinstance(reasoning, dict) else None)


@dataclass
class JobHooks:
    """A queued job's per-step callbacks (the runtime's `progress` and `latents` arguments)."""

    progress: ProgressFn
    latents: LatentFn | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"progress": self.progress, "latents": self.latents}



def warm_batches(max_batch: int, options: RuntimeOptions) -> list[int]:
    """The batch sizes a warm-up runs so that no edit compiles or captures mid-service: the largest batch of
    each CUDA graph bucket (a batch runs padded to its bucket), every size when compiled without graphs (the
    blocks are specialised per batch), else one edit and the largest batch (the forecast's step times)."""
    from ..runtime.batching import graph_bucket

    if options.cuda_graphs:
        return list({graph_bucket(b): b for b in range(1, max_batch + 1)}.values())
    if options.compile:
        return list(range(1, max_batch + 1))
    return list(dict.fromkeys((1, max_batch)))
