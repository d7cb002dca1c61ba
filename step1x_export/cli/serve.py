"""`step1x-export serve`: the HTTP edit service, in one process or as Ray Serve replicas."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from ..validate import MAX_PIXELS
from .common import user_errors
from .runtime_options import RuntimeArgs, runtime_options


@click.command()
@runtime_options()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default answers this machine only; 0.0.0.0 exposes the service.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=click.IntRange(1, 64), default=None,
              help="Same-size edits sharing each DiT call (per replica): a request joins the running batch at the "
                   "next denoising step and leaves when its own steps end; 1 runs edits one at a time [default: 4 "
                   "where the runtime can batch (the torch backend, v1.0/v1.1, no --sequential-load), else 1; "
                   "with --preset, its batch (1)].")
@click.option("--max-queue", type=click.IntRange(0, 10_000), default=64, show_default=True,
              help="Most edits waiting to join the batch (per replica; it bounds the memory their images hold). "
                   "Below it a request is admitted while its predicted completion fits its deadline (--timeout "
                   "or its timeout_s); otherwise 503 + Retry-After (the predicted wait).")
@click.option("--refuse-late/--no-refuse-late", default=True, show_default=True,
              help="Answer 503 + Retry-After at once to a request predicted to finish past its deadline; with "
                   "--no-refuse-late it is admitted and stopped at the deadline (504).")
@click.option("--adaptive-batch/--fixed-batch", default=True, show_default=True,
              help="Adaptive: batches take the measured number of edits (up to --max-batch; the warm-up measures "
                   "one edit and one full batch) with the most denoising steps done per second, so batching never "
                   "costs throughput (a compute-bound step can cost more per edit in a batch); fixed: up to "
                   "--max-batch always. /metrics: step1x_batch_limit.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 86_400), default=300.0, show_default=True,
              help="Seconds per request, queue wait included; past it the edit is stopped and the answer is 504.")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1024), default=20.0, show_default=True,
              help="Largest request body (MB); larger is 413.")
@click.option("--max-megapixels", type=click.FloatRange(0.001, MAX_PIXELS / 1e6), default=MAX_PIXELS / 1e6,
              show_default=True, help="Largest input image (decoded); larger is 413 (`edit` refuses more too).")
@click.option("--max-steps", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="Most denoising steps a request may ask for.")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution of requests that give none [default: the model's largest profile level, as "
                   "`edit`: 1024 for the real model, 256 for the tiny ones]; also the warm-up's size.")
@click.option("--max-size-level", type=click.IntRange(16, 4096), default=None,
              help="Largest size_level a request may ask for [default: the model's largest profile level].")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run one small edit at startup; /readyz turns ready after it.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve replicas (needs the `ray` extra).")
@click.option("--ray-address", default=None,
              help="An existing Ray cluster (e.g. ray://head:10001 or auto) [default: start a local Ray].")
@click.option("--replicas", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Ray replicas, each with its own runtime.")
@click.option("--min-replicas", type=click.IntRange(0, 1024), default=None,
              help="Autoscaling lower bound (with --max-replicas; replaces --replicas).")
@click.option("--max-replicas", type=click.IntRange(1, 1024), default=None, help="Autoscaling upper bound.")
@click.option("--gpus-per-replica", type=click.FloatRange(0, 64), default=None,
              help="GPUs each replica holds; above 1 they are reserved together on one machine (a placement "
                   "group) [default: 1 if this machine has CUDA and --device is not cpu, else 0].")
@click.option("--cpus-per-replica", type=click.FloatRange(0.1, 256), default=1.0, show_default=True,
              help="CPUs each replica holds (also its edits' torch thread count, rounded down, unless --threads).")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every /v1 route (repeat for several keys). A key on the "
                   "command line shows in the process list: prefer --api-keys-file or STEP1X_API_KEYS "
                   "(comma-separated), which are read too. Wrong or missing: 401.")
@click.option("--api-keys-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file of API keys, one a line (# comments).")
@click.option("--max-concurrent-per-key", type=click.IntRange(0, 10_000), default=0, show_default=True,
              help="Requests one key may have running on /v1 at once; one more is 429 + Retry-After (about one "
                   "edit's seconds). 0: no limit.")
@click.option("--protect-health/--open-health", default=False, show_default=True,
              help="With keys set, also require one on /, /healthz, /readyz and /metrics (load balancers and "
                   "Prometheus then need a key); by default they stay open.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@user_errors
def serve(
    runtime: RuntimeArgs, host: str, port: int, max_batch: int | None, max_queue: int, refuse_late: bool,
    adaptive_batch: bool, timeout_s: float, max_upload_mb: float, max_megapixels: float, max_steps: int,
    size_level: int | None,
    max_size_level: int | None, warmup: bool, use_ray: bool, ray_address: str | None, replicas: int,
    min_replicas: int | None, max_replicas: int | None, gpus_per_replica: float | None, cpus_per_replica: float,
    api_keys: tuple[str, ...], api_keys_file: Path | None, max_concurrent_per_key: int, protect_health: bool,
    log_level: str,
) -> None:
    """Serve edits over HTTP: POST /v1/edits (multipart image + instruction -> PNG, or a stream of progress
    events), OpenAI's images API (POST /v1/images/edits, /v1/images/generations, GET /v1/models), a web page
    at /, /healthz, /readyz and /metrics (Prometheus).

    One process runs one runtime; same-size edits share its DiT calls (--max-batch), joining at step
    boundaries, and a request is admitted while it is predicted to finish by its deadline; --ray runs
    --replicas runtimes (one per GPU by default) behind Ray Serve's HTTP proxy. Ctrl-C stops after the
    accepted edits finish. The model flags are edit's; without any, the tiny random-weight model is served.
    With --ray, leave --device unset: each replica sees only the GPUs Ray gave it.
    """
    from ..serve.auth import KeyPolicy, read_keys
    from ..serve.spec import RuntimeSpec, ServeLimits

    if ray_address and not use_ray:
        raise click.UsageError("--ray-address needs --ray")
    keys = KeyPolicy(tuple(read_keys(api_keys, api_keys_file)), max_concurrent_per_key, protect_health)
    if use_ray and keys.enabled:
        raise click.UsageError("API keys are checked by the single-process server; with --ray, put them in front "
                               "of Ray Serve's proxy (or run without --ray)")
    for flag, path in (("--model-dir", runtime.model_dir), ("--engine-dir", runtime.engine_dir),
                       ("--quant", runtime.quant)):
        if path is not None and not path.exists():  # now, not later in the background load
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if runtime.backend == "torch" and runtime.model_dir is None and runtime.model_name is None:
        runtime = replace(runtime, model_name="tiny")  # the embedded default: try the service anywhere
    if runtime.preset is not None:  # the batch the preset's memory plan holds, and no more
        from ..presets import get_preset

        batch = get_preset(runtime.preset).max_batch
        if (max_batch or batch) > batch:
            raise click.UsageError(f"--max-batch {max_batch} exceeds --preset {runtime.preset}'s batch {batch}")
        max_batch = batch if max_batch is None else max_batch
    spec = RuntimeSpec.from_load_kwargs({**runtime.load_kwargs(), "max_batch": max_batch})
    limits = ServeLimits(
        max_queue=max_queue, timeout_s=timeout_s, max_upload_bytes=round(max_upload_mb * 1e6),
        max_pixels=round(max_megapixels * 1e6), max_steps=max_steps, max_size_level=max_size_level,
        default_size_level=size_level, warmup=warmup, refuse_late=refuse_late, adaptive_batch=adaptive_batch,
    )
    if not use_ray:
        from ..serve.server import run_server

        guarded = f"; {len(keys.keys)} API key(s) required on /v1" if keys.enabled else ""
        click.echo(f"serving {spec.identity()} on http://{host}:{port}/ (the model loads in the background; "
                   f"GET /readyz says when it is ready{guarded})")
        run_server(spec, limits, host=host, port=port, log_level=log_level, keys=keys)
        return
    from ..serve.ray_app import ReplicaPlan, run_ray

    plan = ReplicaPlan(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                       gpus_per_replica=_default_gpus(runtime.device) if gpus_per_replica is None else gpus_per_replica,
                       cpus_per_replica=cpus_per_replica)
    click.echo(f"starting Ray Serve ({ray_address or 'local Ray'}): {plan} on http://{host}:{port}/")
    run_ray(spec, limits, plan, host=host, port=port, address=ray_address)


def _default_gpus(device: str | None) -> float:
    import torch

    return 1.0 if device != "cpu" and torch.cuda.is_available() else 0.0
