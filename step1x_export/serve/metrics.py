"""Prometheus metrics of one server, in their own registry (several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Edit latency buckets in seconds: tiny CPU models edit in ~0.1 s, the full model on a GPU in seconds to a
# minute, and a queued request can wait several edits.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, float("inf"))
BATCH_BUCKETS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float],
                 batch_limit: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("step1x_requests", "HTTP edit requests answered, by status code", ["status"],
                                registry=r)
        self.errors = Counter("step1x_errors", "Edit requests that failed, by error code", ["error"], registry=r)
        self.latency = Histogram("step1x_request_seconds", "Edit request latency (queue wait + edit)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queued = Histogram("step1x_queue_wait_seconds", "Time an edit waited for the runtime",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Counter("step1x_stage_seconds", "Seconds spent per runtime stage", ["stage"], registry=r)
        self.dit_steps = Counter("step1x_dit_steps", "Denoising steps run (each one DiT call on cond+uncond)",
                                 registry=r)
        self.depth = Gauge("step1x_queue_depth", "Edits waiting for the runtime", registry=r)
        self.depth.set_function(queue_depth)
        self.busy = Gauge("step1x_running_edits", "Edits running now (the batch: up to --max-batch per runtime)",
                          registry=r)
        self.busy.set_function(running)
        self.batch = Histogram("step1x_edit_batch_size", "Mean number of edits sharing each DiT step of an edit",
                               buckets=BATCH_BUCKETS, registry=r)
        self.limit = Gauge("step1x_batch_limit", "Edits a batch takes now: with adaptive batching the measured "
                           "size (up to --max-batch) with the most steps per second", registry=r)
        self.limit.set_function(batch_limit)
        self.ready = Gauge("step1x_ready", "1 once the model is loaded and warm", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
