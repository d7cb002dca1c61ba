"""First light: everything a GPU's first 480 s can tell us about the GPU path, most important first.

    OUT=/some/dir bash benchmarks/first_light.sh                             # what the device tool runs
    OUT=/tmp/fl bash benchmarks/first_light.sh --model tiny --device cpu     # CPU dry run (tests/test_first_light.py)

Steps (each skipped, with the reason, when fewer than its `need_s` seconds of `--budget-s` are left; each is
try/except: a failure is a row; `$OUT/first_light.json` is rewritten after every step; the table is last):
  env        device, driver, versions; the CUDA context's size (driver-level used memory after init)
  kernels    FP8 `_scaled_mm` / INT8 `_int_mm` at the DiT's widest shapes (M = 2 x 8832 rows): error vs the exact
             emulation and vs the float layer, ms vs the bf16 GEMM; FP8 `use_fast_accum` on vs off (K = 12288,
             15360); INT8 compiled: whether inductor still writes an int32 [M, N] (epilogue fused or not), ms
  fp8_compiles   the default runtime with an FP8 artifact (compile + CUDA graphs) at two sizes: compiles == 2
  dit_step   a full-size DiT step at 1024^2 through the ladder: eager bf16, compiled, compiled + graphs, each
             attention kernel (flash / efficient / cudnn), FP8: ms/step, p10-p90, error vs fp32, activations
  preset_24gb    a whole 1024^2 edit in the 24gb configuration under a 24 GiB per-process cap: driver-level
             peak vs the plan
  teacache   TeaCache 0.2 / 0.4 against no cache (28 steps, eager): speedup, calls, latent PSNR
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from check_quant import layer_kernel_check
from torch import nn

from step1x_export.bench.checks import SKIP_CUDA, CheckReport, free, script_device, table
from step1x_export.bench.environment import environment_info, header_lines
from step1x_export.bench.ladder import LADDER, LadderRow, LadderSettings, ModelState, psnr, rel_err, run_ladder
from step1x_export.bench.measure import measure, synchronize
from step1x_export.bench.models import BenchModels, activation_check, build_dit, build_vae, dit_inputs
from step1x_export.calibrate.collect import InputStats
from step1x_export.calibrate.qlinear import Kernel, QuantLinear
from step1x_export.calibrate.recipes import RECIPES, layer_scales
from step1x_export.precision import Precision
from step1x_export.runtime.engines.torch_engine import TorchEngine
from step1x_export.runtime.step.caching import CachedStep, CacheSpec
from step1x_export.runtime.step.engine_step import engine_step_fn
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.sampling import denoise, guided_euler

GiB = 2**30
STEPS = ("env", "kernels", "fp8_compiles", "dit_step", "preset_24gb", "teacache")
# Full-size budgets (s): what each step needs left to start (cold compile included), H200-sized guesses.
NEED_S = {"env": 0, "kernels": 40, "fp8_compiles": 90, "dit_step": 150, "preset_24gb": 100, "teacache": 70}
ROWS = 17664  # 2 x (640 + 2 x 4096): the DiT's GEMM rows at 1024^2, batch 2
# Eager + graphs: compiled blocks keep the SDPA kernel of the context they were first traced under, and one
# process runs every row here, so each kernel is measured where its context decides it (eager, then captured).
ATTENTION_ROWS = tuple(LadderRow(f"{k} attention, graphs", {"attention": k, "compile": False},
                                 f"eager blocks + CUDA graphs, SDPA on {k}") for k in ("flash", "efficient", "cudnn"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "first_light_out")))
    p.add_argument("--model", default="v1.1", help="full-size config; 'tiny' for a CPU dry run")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--size", type=int, default=None, help="DiT step / edit size (default 1024; tiny 32)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"which steps, in order ({', '.join(STEPS)})")
    p.add_argument("--budget-s", type=float, default=480.0, help="steps that would start past this are skipped")
    p.add_argument("--ladder-steps", type=int, default=4, help="timed denoising steps per ladder row")
    p.add_argument("--cache-steps", type=int, default=28, help="denoising steps of the TeaCache runs")
    p.add_argument("--memory-cap-gib", type=float, default=24.0, help="per-process cap for the 24gb preset edit")
    p.add_argument("--compile-cpu", action="store_true", help="CPU dry run: compile the ladder's rows too (slow)")
    args = p.parse_args(argv)
    args.tiny = get_config(args.model).tiny_qwen is not None
    args.size = args.size or (32 if args.tiny else 1024)
    args.scale = 0.0 if args.tiny else 1.0
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {sorted(unknown)}; choose from {', '.join(STEPS)}")
    return args


# -- env ------------------------------------------------------------------------------------------------
def env_step(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__}
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the context and the first kernel
        free_b, total_b = torch.cuda.mem_get_info(device)
        out |= {"capability": list(torch.cuda.get_device_capability(device)), "total_gib": total_b / GiB,
                "context_gib": (total_b - free_b - torch.cuda.memory_reserved(device)) / GiB,
                "cudnn": torch.backends.cudnn.version()}
    else:
        out["status"] = f"ok ({SKIP_CUDA} for the context size)"
    return out


# -- kernels --------------------------------------------------------------------------------------------
def _layer(k: int, n: int, device: torch.device, dtype: torch.dtype) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(k + n)
    linear = nn.Linear(k, n, device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=k**-0.5)
    # Outlier channels, as the DiT's activations have (calibration scales follow the largest).
    x = torch.randn(ROWS, k, device=device, dtype=dtype) * torch.linspace(0.2, 4.0, k, device=device, dtype=dtype)
    return linear, x


def fast_accum_errors(linear: nn.Linear, x: torch.Tensor) -> dict[str, Any]:
    """FP8 `_scaled_mm` with and without fast accumulation against the exact emulation of the same layer."""
    s = layer_scales(linear, InputStats(x.float().abs().amax(0)), RECIPES["fp8"], alpha=0.5, per_channel=True)
    q = QuantLinear.from_linear(linear, RECIPES["fp8"].fmt, input_scale=s.input_scale, weight_scale=s.weight_scale)
    if q.kernel is not Kernel.SCALED_MM:
        return {"status": SKIP_CUDA}
    with torch.inference_mode():
        emulated = q.use_kernel(Kernel.EMULATE)(x).float()
        q.use_kernel(None)
        xq = (x.float() * q._act_mul).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale_a = q.input_scale.reshape(1, 1).repeat(x.shape[0], 1)
        out = {}
        for fast in (True, False):
            y = torch._scaled_mm(xq, q.weight.t(), scale_a=scale_a, scale_b=q.weight_scale.reshape(1, -1),
                                 bias=q.bias, out_dtype=torch.bfloat16, use_fast_accum=fast).float()
            out[f"rel_err_fast_accum_{fast}"] = rel_err(y, emulated)
            out[f"ms_fast_accum_{fast}"] = measure("mm", lambda f=fast: torch._scaled_mm(
                xq, q.weight.t(), scale_a=scale_a, scale_b=q.weight_scale.reshape(1, -1), bias=q.bias,
                out_dtype=torch.bfloat16, use_fast_accum=f), device=x.device, runs=5).median_ms
    return out


def int8_compiled(linear: nn.Linear, x: torch.Tensor) -> dict[str, Any]:
    """INT8 QuantLinear compiled by inductor: does the generated code still allocate an int32 [M, N] buffer
    (the epilogue not fused into the GEMM), and eager vs compiled ms."""
    from torch._inductor.utils import run_and_get_code

    s = layer_scales(linear, InputStats(x.float().abs().amax(0)), RECIPES["int8-sq"], alpha=0.5, per_channel=True)
    q = QuantLinear.from_linear(linear, RECIPES["int8-sq"].fmt, input_scale=s.input_scale,
                                weight_scale=s.weight_scale, smooth=s.smooth)
    if q.kernel is not Kernel.INT_MM:
        return {"status": SKIP_CUDA}
    compiled = torch.compile(q, fullgraph=True)
    with torch.inference_mode():
        eager = q(x).float()
        got, codes = run_and_get_code(compiled, x)
        code = "\n".join(codes)
        n = linear.out_features
        return {"int32_mn_buffer": f"{x.shape[0]}, {n}), ({n}, 1), torch.int32" in code,
                "extern_int_mm": "extern_kernels._int_mm" in code,
                "rel_err_compiled_vs_eager": rel_err(got.float(), eager),
                "eager_ms": measure("eager", lambda: q(x), device=x.device, runs=5).median_ms,
                "compiled_ms": measure("compiled", lambda: compiled(x), device=x.device, runs=5).median_ms}


def kernels_step(config, device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    h = config.dit.hidden_size
    mlp = int(h * config.dit.mlp_ratio)
    shapes = {"linear1": (h, 3 * h + mlp), "linear2": (h + mlp, h), "mlp_out": (mlp, h)}
    out: dict[str, Any] = {}
    for name, (k, n) in shapes.items():
        linear, x = _layer(k, n, device, dtype)
        if tiny:
            x = x[:64]
        out[name] = layer_kernel_check(linear, x, device)
        if name != "linear1":
            out[name]["fast_accum"] = fast_accum_errors(linear, x)
        else:
            out[name]["int8_compiled"] = int8_compiled(linear, x)
        del linear, x
        free(device)
    out["status"] = "ok" if device.type == "cuda" else f"ok ({SKIP_CUDA}: emulation only)"
    return out


# -- the runtime and the DiT step (the ladder's machinery) ----------------------------------------------
def ladder_cells(models: BenchModels, sizes: list[int], rows: tuple[LadderRow, ...], args: argparse.Namespace,
                 deadline: float) -> list[dict[str, Any]]:
    settings = LadderSettings(steps=args.ladder_steps, compile_on_cpu=args.compile_cpu, deadline=deadline)
    inputs = [dit_inputs(models.config, s, args.ladder_steps + 1, models.device) for s in sizes]
    return [r.to_dict() for r in run_ladder(models, inputs, settings, rows=rows, state=ModelState())]


def fp8_compiles_step(config, device, dtype, args, report: CheckReport) -> dict[str, Any]:
    models = _dit_models(config, device, dtype)
    fp8 = next(r for r in LADDER if r.quant == "fp8" and not r.options.get("attention_fp8"))
    sizes = [args.size // 2, args.size]
    cells = ladder_cells(models, sizes, (fp8,), args, time.monotonic() + report.left_s())
    ran = [c for c in cells if c["status"] == "ok"]
    total = sum(c["compiles"] for c in ran)  # one runtime per cell; the process's backend is shared
    return {"cells": cells, "sizes": sizes, "compiles": total if ran else None,
            "compiles_ok": total == 2 if ran else None}


def dit_step(config, device, dtype, args, report: CheckReport) -> dict[str, Any]:
    models = _dit_models(config, device, dtype)
    activations = activation_check(models.dit, dit_inputs(config, args.size, 2, device), dtype)
    rows = (*LADDER[:3], *ATTENTION_ROWS, next(r for r in LADDER if r.name == "+ FP8 GEMMs"))
    cells = ladder_cells(models, [args.size], rows, args, time.monotonic() + report.left_s() - 10)
    keep = ("row", "status", "median_ms", "p10_ms", "p90_ms", "first_call_ms", "speedup", "rel_err_fp32",
            "compiles", "note", "error")
    return {"activations": activations, "cells": [{k: c.get(k) for k in keep} for c in cells]}


def _dit_models(config, device, dtype) -> BenchModels:
    return BenchModels(config=config, dit=build_dit(config, device, dtype, seed=0),
                       ae=build_vae(config, device, torch.float32, seed=1), mllm=None, device=device, dtype=dtype,
                       vae_dtype=torch.float32)


# -- the 24gb preset under a memory cap -----------------------------------------------------------------
def preset_step(config, device, dtype, args) -> dict[str, Any]:
    from step1x_export.bench.models import build_mllm_with_processor
    from step1x_export.bench.runtimes import Shared, bench_picture, bench_runtime
    from step1x_export.calibrate.apply import quantize_model
    from step1x_export.calibrate.collect import StatsCollector
    from step1x_export.calibrate.qcheckpoint import WEIGHT_ONLY_DEFAULT
    from step1x_export.calibrate.recipes import build_artifact, select_layers
    from step1x_export.calibrate.weight_only import quantize_weights_
    from step1x_export.plan.plan import make_plan
    from step1x_export.runtime.engines.mllm import prepare_mllm
    from step1x_export.runtime.engines.torch_engine import TorchEncoder
    from step1x_export.runtime.options import RuntimeOptions

    dit = build_dit(config, device, dtype, seed=0)
    x = dit_inputs(config, args.size, 2, device)
    collector = StatsCollector(dit)
    with collector.active(), torch.inference_mode():
        dit(x.img.to(dtype), x.pe, x.t.to(dtype), x.llm_embedding.to(dtype), x.llm_mask)
    artifact = build_artifact(dit, collector.stats, "fp8", model_hash="random-weights",
                              calibration={"steps": 1, "size": args.size})
    quantize_model(dit, artifact, check_hash=False)
    linears = [n for n, m in dit.named_modules() if isinstance(m, nn.Linear)]
    quantize_weights_(dit, select_layers(linears, WEIGHT_ONLY_DEFAULT, ()), RECIPES["int8-sq"].fmt)
    encoder = TorchEncoder(prepare_mllm(build_mllm_with_processor(config, device, dtype), "int8"))
    models = BenchModels(config=config, dit=dit, ae=build_vae(config, device, torch.float32, seed=1), mllm=None,
                         device=device, dtype=dtype, vae_dtype=torch.float32)
    out: dict[str, Any] = {}
    torch._dynamo.reset()  # nothing compiled by earlier steps (or the modules it saw) stays under the cap
    if device.type == "cuda":
        free(device)
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GiB / total), device)
        out["cap_gib"] = args.memory_cap_gib
    options = RuntimeOptions(precision=Precision.BF16 if dtype == torch.bfloat16 else Precision.FP32,
                             cuda_graphs=False, mllm_quant="int8", compile=None if device.type == "cuda" else False)
    try:
        with bench_runtime(models, options, Shared(encoder)) as rt:
            t0 = time.perf_counter()
            rt.edit(bench_picture(args.size), "make the sky blue", seed=0, steps=4, size_level=args.size)
            out |= {"wall_s": time.perf_counter() - t0, "peak": rt.peak_memory.what,
                    "peak_gib": None if rt.peak_memory.bytes is None else rt.peak_memory.bytes / GiB,
                    "stage_s": rt.timings}
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    if not args.tiny:
        out["plan_gib"] = make_plan(args.model, args.size, preset="24gb").total / GiB
    return out


# -- TeaCache -------------------------------------------------------------------------------------------
def teacache_step(config, device, dtype, args) -> dict[str, Any]:
    model = build_dit(config, device, dtype, seed=0)
    x = dit_inputs(config, args.size, args.cache_steps, device)
    x.llm_embedding = x.llm_embedding.to(dtype)
    engine = TorchEngine(model, dit_spec(config), dtype, device)

    def run(step_fn, begin=None) -> tuple[float, torch.Tensor]:
        update = guided_euler(step_fn)
        if begin is not None:
            begin(len(x.timesteps) - 1)
        synchronize(device)
        t0 = time.perf_counter()
        latent = denoise(update, x.noise, x.ref, x.timesteps, guidance=6.0, truncate=0.93,
                         conditioning=(x.pe, x.llm_embedding, x.llm_mask))
        synchronize(device)
        return time.perf_counter() - t0, latent.float()

    run(engine_step_fn(engine))  # warm-up
    base_s, ref = run(engine_step_fn(engine))
    out: dict[str, Any] = {"steps": args.cache_steps, "no_cache_s": base_s, "thresholds": []}
    for threshold in (0.2, 0.4):
        step = CachedStep(engine, CacheSpec("teacache", threshold))
        seconds, latent = run(step, step.begin)
        out["thresholds"].append({"threshold": threshold, "s": seconds, "speedup": base_s / seconds,
                            "computed": step.stats.computed, "reused": step.stats.reused,
                            "latent_psnr_db": psnr(latent, ref)})
    return out


def summary(entry: dict[str, Any]) -> dict[str, Any]:
    """A few headline figures per step, for the table (the JSON has everything)."""
    figures: dict[str, Any] = {}
    if entry["name"] == "dit_step":
        for c in entry.get("cells", []):
            if c.get("median_ms") is not None:
                figures[c["row"]] = f"{c['median_ms']:.0f}ms err={c['rel_err_fp32'] or 0:.2g}"
    if entry["name"] == "teacache":
        figures = {f"tc{r['threshold']}": f"x{r['speedup']:.2f} {r['latent_psnr_db']:.1f}dB"
                   for r in entry["thresholds"]}
    return figures


def markdown(entries: list[dict[str, Any]]) -> str:
    lines = ["| step | status | s | headline |", "|---|---|---|---|"]
    for e in entries:
        head = ", ".join(f"{k}: {v}" for k, v in summary(e).items()) or ", ".join(
            f"{k}={e[k]}" for k in ("compiles", "peak_gib", "plan_gib", "context_gib") if e.get(k) is not None)
        lines.append(f"| {e['name']} | {e['status'][:40]} | {e.get('elapsed_s', 0):.0f} | {head} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = script_device(args.device, full_size=bool(not args.tiny))
    if isinstance(device, str):
        print(device)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    config = get_config(args.model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment_info(device)
    conditions = {"model": args.model, "size": args.size, "budget_s": args.budget_s, "weights": "random"}
    print("\n".join(header_lines(env, conditions)), flush=True)
    report = CheckReport(args.out_dir / "first_light.json", env, {k: str(v) for k, v in vars(args).items()}, start,
                         args.budget_s)
    runs = {"env": lambda: env_step(device),
            "kernels": lambda: kernels_step(config, device, dtype, args.tiny),
            "fp8_compiles": lambda: fp8_compiles_step(config, device, dtype, args, report),
            "dit_step": lambda: dit_step(config, device, dtype, args, report),
            "preset_24gb": lambda: preset_step(config, device, dtype, args),
            "teacache": lambda: teacache_step(config, device, dtype, args)}
    for name in args.steps.split(","):
        report.run(name, runs[name], need_s=NEED_S[name] * args.scale)
        free(device)
    report.data["notes"].append(f"total wall time {time.monotonic() - start:.1f} s")
    report.save()
    print(table(report.data["entries"]))
    print()
    print(markdown(report.data["entries"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
