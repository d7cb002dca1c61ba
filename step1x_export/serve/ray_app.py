"""Ray Serve: the same HTTP app, one runtime per replica, replicas spread over GPUs and machines.

Each replica builds its runtime in its constructor (Ray routes to it only once it is loaded and warm)
and answers through Serve's ingress with the very app `serve` runs alone, so the API, the errors and
the metrics are the same. A replica that needs several GPUs reserves them as one placement-group
bundle, so they are granted together on one machine or not at all.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

from .app import create_app
from .service import EditService
from .spec import RuntimeSpec, ServeLimits

APP_NAME = "step1x-edit"
PREFER_LOCAL = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas and what each one holds."""

    replicas: int = 1  # fixed count, unless autoscaling bounds are given
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0  # 0 on CPU; >1: one bundle with all of them (one machine)
    cpus_per_replica: float = 1.0
    target_ongoing_requests: float = 2.0  # autoscaling: requests per replica it aims for

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both min_replicas and max_replicas for autoscaling, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:  # type: ignore[operator]
            raise ValueError(f"autoscaling bounds must satisfy 0 <= min <= max, got {self.min_replicas}.."
                             f"{self.max_replicas}")
        if self.gpus_per_replica > 1 and self.gpus_per_replica != int(self.gpus_per_replica):
            raise ValueError(f"gpus_per_replica above 1 must be whole GPUs, got {self.gpus_per_replica}")

    def deployment_options(self, limits: ServeLimits) -> dict[str, Any]:
        """`serve.deployment(...).options(**these)`."""
        from ray.serve.config import BackpressureConfig

        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            # One more than the replica's own capacity: a full replica answers its JSON 503 itself; the
            # router holds a bounded overflow only while every replica is full.
            "max_ongoing_requests": limits.max_queue + 2,
            "max_queued_requests": max(1, limits.max_queue),
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=5),
            "graceful_shutdown_timeout_s": limits.timeout_s,  # running edits finish before a replica stops
            "health_check_period_s": 10,
        }
        if self.min_replicas is not None:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.replicas
        if self.gpus_per_replica > 1:
            options["placement_group_bundles"] = [{"CPU": self.cpus_per_replica, "GPU": self.gpus_per_replica}]
            options["placement_group_strategy"] = "STRICT_PACK"
        return options

    def cpus_needed(self) -> int:
        count = self.max_replicas if self.max_replicas is not None else self.replicas
        return math.ceil(count * self.cpus_per_replica)


class EditReplica:
    """One Ray Serve replica: a loaded, warm runtime behind the HTTP app."""

    def __init__(self, spec: RuntimeSpec, limits: ServeLimits, threads: int):
        import torch
        from ray import serve

        spec = replica_spec(spec, threads)
        torch.set_num_threads(spec.options["threads"])  # loading too: the replica's CPUs, not the whole machine's
        context = serve.get_replica_context()
        self.service = EditService(spec, limits, replica=context.replica_id.unique_id)
        self.service.load()
        if self.service.state == "failed":  # let Ray report and retry it instead of serving 503s forever
            raise RuntimeError(f"the replica could not load the model: {self.service.error}")

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service, load_on_startup=False)

    def check_health(self) -> None:
        if self.service.state != "ready":
            raise RuntimeError(f"model state {self.service.state}: {self.service.error}")


def replica_spec(spec: RuntimeSpec, threads: int) -> RuntimeSpec:
    """`spec` with `threads` (the CPUs Ray granted the replica) as its edits' thread count, unless the spec
    names one (`--threads`): without it the runtime's own default (one thread for a small model on CPU) would
    run every edit, whatever the replica was given."""
    if spec.options.get("threads") is not None:
        return spec
    return replace(spec, options={**spec.options, "threads": threads})


def build_application(spec: RuntimeSpec, limits: ServeLimits, plan: ReplicaPlan) -> Any:
    from ray import serve

    deployment = serve.deployment(serve.ingress()(EditReplica), name="EditReplica")
    threads = max(1, math.floor(plan.cpus_per_replica))
    return deployment.options(**plan.deployment_options(limits)).bind(spec, limits, threads)


def start_ray(address: str | None, plan: ReplicaPlan, *, host: str, port: int, timeout_s: float) -> None:
    """Connect to `address` (an existing cluster) or start a local Ray sized for the plan; start Serve's proxy."""
    import ray
    from ray import serve

    # Serve's proxy sends a request to a replica on its own node while that one has room; an edit is minutes
    # of compute and its bytes are small, so spread by load instead (this reaches the proxies of a Ray
    # started here; on a cluster, start each node with it, docs/serving.md).
    os.environ.setdefault(PREFER_LOCAL, "0")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(plan.cpus_needed(), 1), include_dashboard=False, log_to_driver=False)
    # The proxy's own limit backs up the app's per-request deadline (queue time in the router included).
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout_s + 30})


def run_ray(spec: RuntimeSpec, limits: ServeLimits, plan: ReplicaPlan, *, host: str, port: int,
            address: str | None = None, blocking: bool = True) -> None:
    """Deploy the app on Ray Serve at http://host:port/; with `blocking`, serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    start_ray(address, plan, host=host, port=port, timeout_s=limits.timeout_s)
    serve.run(build_application(spec, limits, plan), name=APP_NAME, route_prefix="/")
    if not blocking:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # each replica finishes its running edits first (graceful_shutdown_timeout_s)
    ray.shutdown()
