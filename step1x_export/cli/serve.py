"""`step1x-export serve`: the HTTP edit service, in one process or as Ray Serve replicas."""

from __future__ import annotations

from pathlib import Path

import click

from .common import user_errors

EXISTING_DIR = click.Path(path_type=Path, exists=True, file_okay=False)


@click.command()
@click.option("--model", "model_name", type=click.Choice(["tiny", "tiny-v1.0"]),
              help="A tiny random-weight model (testing; outputs are not real edits) [default when neither "
                   "--model-dir nor --engine-dir is given: tiny]. With --engine-dir it names the torch MLLM.")
@click.option("--model-dir", type=EXISTING_DIR, help="Folder with the official files (as `edit`).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="What runs the VAE and DiT (as `edit`); onnxruntime/tensorrt need --engine-dir.")
@click.option("--engine-dir", type=EXISTING_DIR, help="Export folder (onnxruntime) or engine folder (tensorrt).")
@click.option("--quant", "quant_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Calibration artifact applied to the torch DiT (FP8 / INT8 W8A8), for every request.")
@click.option("--version", type=click.Choice(["v1.0", "v1.1"]), default="v1.1", show_default=True,
              help="Model version of the checkpoint in --model-dir.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="DiT/MLLM dtype [default: bf16 for --model-dir on a GPU, else fp32].")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu]. With --ray each "
              "replica sees only its own GPUs, so leave it unset there.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Capture the whole denoising step per shape (CUDA only; as `edit`).")
@click.option("--compile/--no-compile", "compile_dit", default=True, show_default=True,
              help="torch.compile each DiT block (torch backend on CUDA; the warm-up edit pays the compile).")
@click.option("--sequential-load", is_flag=True, help="Load one stage at a time (GPUs with <= 24 GB; slower edits).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default answers this machine only; 0.0.0.0 exposes the service.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-queue", type=click.IntRange(0, 10_000), default=8, show_default=True,
              help="Edits that may wait behind the running one (per replica); more get 503 + Retry-After.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 86_400), default=300.0, show_default=True,
              help="Seconds per request, queue wait included; past it the edit is stopped and the answer is 504.")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1024), default=20.0, show_default=True,
              help="Largest request body (MB); larger is 413.")
@click.option("--max-megapixels", type=click.FloatRange(0.001, 64), default=16.0, show_default=True,
              help="Largest input image (decoded); larger is 413.")
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
              help="CPUs each replica holds (also its torch thread count on CPU).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@user_errors
def serve(
    model_name: str | None, model_dir: Path | None, backend: str, engine_dir: Path | None, quant_path: Path | None,
    version: str, dtype: str | None, device: str | None, cuda_graphs: bool, compile_dit: bool, sequential_load: bool,
    host: str, port: int, max_queue: int, timeout_s: float, max_upload_mb: float, max_megapixels: float,
    max_steps: int, size_level: int | None, max_size_level: int | None, warmup: bool, use_ray: bool,
    ray_address: str | None, replicas: int, min_replicas: int | None, max_replicas: int | None,
    gpus_per_replica: float | None, cpus_per_replica: float, log_level: str,
) -> None:
    """Serve edits over HTTP: POST /v1/edits (multipart image + instruction -> PNG), a web page at /,
    /healthz, /readyz and /metrics (Prometheus).

    One process runs one runtime and edits one image at a time behind a bounded queue; --ray runs
    --replicas runtimes (one per GPU by default) behind Ray Serve's HTTP proxy. Ctrl-C stops after the
    accepted edits finish.
    """
    from ..serve.spec import RuntimeSpec, ServeLimits

    if ray_address and not use_ray:
        raise click.UsageError("--ray-address needs --ray")
    spec = RuntimeSpec(**_runtime_source(model_name, model_dir, backend, engine_dir, quant_path), backend=backend,
                       device=device, dtype=dtype, cuda_graphs=cuda_graphs, compile=compile_dit,
                       sequential_load=sequential_load, version=version)
    limits = ServeLimits(
        max_queue=max_queue, timeout_s=timeout_s, max_upload_bytes=round(max_upload_mb * 1e6),
        max_pixels=round(max_megapixels * 1e6), max_steps=max_steps, max_size_level=max_size_level,
        default_size_level=size_level, warmup=warmup,
    )
    if not use_ray:
        from ..serve.server import run_server

        click.echo(f"serving {spec.identity()} on http://{host}:{port}/ (the model loads in the background; "
                   "GET /readyz says when it is ready)")
        run_server(spec, limits, host=host, port=port, log_level=log_level)
        return
    from ..serve.ray_app import ReplicaPlan, run_ray

    plan = ReplicaPlan(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                       gpus_per_replica=_default_gpus(device) if gpus_per_replica is None else gpus_per_replica,
                       cpus_per_replica=cpus_per_replica)
    click.echo(f"starting Ray Serve ({ray_address or 'local Ray'}): {plan} on http://{host}:{port}/")
    run_ray(spec, limits, plan, host=host, port=port, address=ray_address)


def _runtime_source(model_name: str | None, model_dir: Path | None, backend: str, engine_dir: Path | None,
                    quant_path: Path | None) -> dict[str, str | None]:
    """`RuntimeSpec`'s source / mllm / quant from the options, with edit's rules for which go together."""
    from ..step1x_ref.loading import QWEN_DIR

    if model_dir is not None and model_name is not None:
        raise click.UsageError("give --model-dir DIR or --model tiny, not both")
    if backend == "torch" and engine_dir is not None:
        raise click.UsageError("--engine-dir is for --backend onnxruntime or tensorrt")
    if backend != "torch" and engine_dir is None:
        raise click.UsageError(f"--backend {backend} needs --engine-dir")
    if quant_path is not None and backend != "torch":
        raise click.UsageError("--quant applies to --backend torch (exported graphs carry their own quantization)")
    quant = str(quant_path) if quant_path else None
    if backend == "torch":
        return {"source": str(model_dir) if model_dir is not None else model_name or "tiny", "mllm": None,
                "quant": quant}
    mllm = str(model_dir / QWEN_DIR) if model_dir is not None else model_name
    return {"source": str(engine_dir), "mllm": mllm, "quant": quant}


def _default_gpus(device: str | None) -> float:
    import torch

    return 1.0 if device != "cpu" and torch.cuda.is_available() else 0.0
