"""Device check of the runtime as it ships: one `Step1XEditRuntime` in the default configuration (compile,
CUDA graphs, bounded graph cache) serving several edit sizes, against an eager runtime over the same
weights; compile and graph counts from its stats; peak memory of a whole edit with the MLLM.

On CPU (dry run) compile is forced on, so the compiled path is what is compared with eager; CUDA graphs
resolve off there, and the entry says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from step1x_export.bench.checks import SKIP_CUDA, CheckReport, free
from step1x_export.bench.ladder import max_rel_err, rel_err
from step1x_export.bench.measure import short_error
from step1x_export.bench.models import (
    BenchModels,
    activation_check,
    build_dit,
    build_mllm_with_processor,
    build_vae,
    dit_inputs,
)
from step1x_export.bench.runtimes import Shared, StubEncoder, bench_picture, bench_runtime
from step1x_export.precision import Precision
from step1x_export.runtime.engines.torch_engine import TorchEncoder
from step1x_export.runtime.options import RuntimeOptions
from step1x_export.runtime.runtime import Step1XEditRuntime
from step1x_export.step1x_ref.configs import ModelConfig
from step1x_export.step1x_ref.imaging import edit_size

PROMPT = "make the sky blue"


def _edit(rt: Step1XEditRuntime, w: int, h: int, steps: int) -> tuple[torch.Tensor, list[float]]:
    rt.edit(bench_picture(max(w, h)).resize((w, h)), PROMPT, seed=0, steps=steps, size_level=round((w * h) ** 0.5))
    assert rt.last_latent is not None
    return rt.last_latent.float().cpu(), rt.stats().step_ms


def one_compiled_runtime(models: BenchModels, encoder: Any, sizes: list[tuple[int, int]], args: argparse.Namespace,
                         cuda: bool) -> dict[str, Any]:
    """Eager runtime, then the default-configuration runtime, over the same sizes: final-latent difference per
    size, median step times, and the compiled runtime's stats after all sizes (compiles stay per block type)."""
    precision = Precision.BF16 if models.dtype == torch.bfloat16 else Precision.FP32
    eager_opts = RuntimeOptions(precision=precision, compile=False, cuda_graphs=False)
    default_opts = RuntimeOptions(precision=precision, compile=None if cuda else True, graph_cache=args.graph_cache)
    eager: dict[tuple[int, int], tuple[torch.Tensor, list[float]]] = {}
    with bench_runtime(models, eager_opts, Shared(encoder)) as rt:
        for w, h in sizes[: args.compare]:
            eager[(w, h)] = _edit(rt, w, h, args.steps)
    out: dict[str, Any] = {"sizes": [f"{w}x{h}" for w, h in sizes], "steps": args.steps, "per_size": []}
    with bench_runtime(models, default_opts, Shared(encoder)) as rt:
        out["options"] = {"compile": rt.options.compile, "cuda_graphs": rt.options.cuda_graphs,
                          "graph_cache": rt.options.graph_cache}
        t0 = time.perf_counter()
        for w, h in sizes:
            _edit(rt, w, h, args.steps)  # the first edit of a size: compile (first size only) and capture
            latent, step_ms = _edit(rt, w, h, args.steps)
            row: dict[str, Any] = {"size": f"{w}x{h}", "default_ms_step": statistics.median(step_ms)}
            if (w, h) in eager:
                ref, eager_ms = eager[(w, h)]
                row |= {"eager_ms_step": statistics.median(eager_ms), "rel_diff": rel_err(latent, ref),
                        "max_rel_diff": max_rel_err(latent, ref)}
            out["per_size"].append(row)
        out["wall_s"] = time.perf_counter() - t0
        stats = rt.stats()
    out |= {k: getattr(stats, k) for k in ("compiles", "graphs_captured", "graphs_cached", "graphs_evicted")}
    first = out["per_size"][0]
    out |= {k: first[k] for k in ("eager_ms_step", "default_ms_step", "rel_diff") if k in first}
    if "eager_ms_step" in out:
        out["speedup"] = out["eager_ms_step"] / out["default_ms_step"]
    if not cuda:
        out["status"] = f"ok ({SKIP_CUDA} for graphs; compiled vs eager compared)"
    return out


def edit_peak(models: BenchModels, encoder: Any, mllm_note: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one whole edit in the default configuration, every stage resident."""
    precision = Precision.BF16 if models.dtype == torch.bfloat16 else Precision.FP32
    options = RuntimeOptions(precision=precision, compile=None if models.device.type == "cuda" else True)
    with bench_runtime(models, options, Shared(encoder)) as rt:
        t0 = time.perf_counter()
        result = rt.edit(bench_picture(args.edit_size), PROMPT, seed=0, steps=args.edit_steps,
                         size_level=args.edit_size)
        return {"size": args.edit_size, "steps": args.edit_steps, "mllm": mllm_note,
                "wall_s": time.perf_counter() - t0,  # includes compile and the first capture
                "output_size": list(result.size),
                "peak_mem_gb": None if rt.peak_memory.bytes is None else rt.peak_memory.bytes / 1e9,
                "peak_mem_counter": rt.peak_memory.what, "stage_s": rt.timings, "runtime": rt.stats().summary()}


def check_sizes(config: ModelConfig, args: argparse.Namespace) -> list[tuple[int, int]]:
    """Square sizes first (compared with eager), then other aspect ratios at the largest size level."""
    level = max(args.sizes)
    others = [edit_size(round(1000 * r), 1000, level) for r in (0.5, 0.75, 1.5, 2.0)][: args.aspects]
    return list(dict.fromkeys([(s, s) for s in args.sizes] + others))  # distinct sizes, squares first


def runtime_checks(report: CheckReport, config: ModelConfig, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> None:
    cuda = device.type == "cuda"
    held: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        t0 = time.perf_counter()
        held["models"] = models = BenchModels(config=config, dit=build_dit(config, device, dtype, seed=0),
                                              ae=build_vae(config, device, torch.float32, seed=1), mllm=None,
                                              device=device, dtype=dtype, vae_dtype=torch.float32)
        out = {"params_m": sum(p.numel() for p in models.dit.parameters()) / 1e6, "build_s": time.perf_counter() - t0}
        out["activations"] = activation_check(models.dit, dit_inputs(config, min(args.sizes), 2, device), dtype)
        held["encoder"], held["mllm_note"] = StubEncoder(config, device), "NOT included (--no-mllm)"
        if not args.no_mllm:
            try:
                held["encoder"] = TorchEncoder(build_mllm_with_processor(config, device, dtype))
                shape = "tiny Qwen2.5-VL" if config.tiny_qwen is not None else "Qwen2.5-VL-7B shape"
                held["mllm_note"] = f"included ({shape}, random weights, code-built tokenizer)"
            except Exception as err:  # the DiT + VAE figures are still worth having
                held["mllm_note"] = f"NOT included: build failed ({short_error(err)})"
        out["mllm"] = held["mllm_note"]
        return out

    if report.run("runtime.build", build, need_s=40 * args.scale)["status"] != "ok":
        return
    sizes = check_sizes(config, args)
    report.run("runtime.one_compiled_runtime",
               lambda: one_compiled_runtime(held["models"], held["encoder"], sizes, args, cuda),
               need_s=(60 + 20 * len(sizes)) * args.scale)
    free(device)
    if args.edit_size:
        report.run(f"runtime.edit_peak@{args.edit_size}",
                   lambda: edit_peak(held["models"], held["encoder"], held["mllm_note"], args), need_s=60 * args.scale)
    held.clear()
    free(device)
