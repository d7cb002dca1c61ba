"""First light: everything a GPU's first device call can tell us about the GPU path, most important first.

    OUT=/some/dir bash benchmarks/device.sh first_light                         # what the device tool runs
    OUT=/tmp/fl bash benchmarks/device.sh first_light --model tiny --device cpu  # CPU dry run (tests)

Steps (each skipped, with the reason, when fewer than its `need_s` seconds of `--budget-s` are left; each is
stopped after its `limit_s` (`--limit-s NAME=S` overrides); a failure is a row; `$OUT/first_light.json` holds a
step from its start and is rewritten after every cell; the table is printed last whatever happened):
  env        device, driver, versions; the CUDA context's size (driver-used minus torch-reserved after init)
  ladder     the DiT step at 1024^2 through the runtime: eager bf16, + compile, + CUDA graphs (the default), each
             attention kernel on eager blocks (+ graphs), + FP8 GEMMs; compile, graphs and FP8 again at a second,
             non-round size (1168^2: tokens not a multiple of 64): compiles over both sizes; ms/step, p10-p90,
             error vs fp32, the SDPA kernel each row dispatched (the compiled default's "auto" included)
  context    the CUDA context re-read once cuBLAS, cuDNN and the compiled kernels exist
  kernels    FP8 `_scaled_mm` / INT8 `_int_mm` layers as shipped (bf16 in and out) at the DiT's widest
             shapes (M = 17664 rows; and 17340, not a multiple of 256): error vs the exact emulation, eager and
             compiled ms, the activation quantization and the GEMM apart, vs the bf16 GEMM; FP8 fast accumulation
             on / off; the INT8 epilogue inductor generates for dynamic M (fused, or one pass over an int32 [M, N])
  preset_24gb    a whole 1024^2 edit in the 24gb configuration under a 24 GB card's cap (23.6 GiB minus the
             context), expandable segments: allocated, reserved and driver-level peaks vs the plan
  caching    the DiT call's pieces (head, blocks, final layer, the decision's host read) and the speedup they
             project for upstream's TeaCache decision patterns (not PSNR: the weights are random)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from step1x_export.bench.checks import SKIP_CUDA, CheckReport, free, script_device, table
from step1x_export.bench.environment import environment_info, header_lines
from step1x_export.bench.kernels import compiled_int8_form, shipped_layer_ms
from step1x_export.bench.ladder import LADDER, LadderRow, LadderSettings, ModelState, rel_err, run_cell, run_ladder
from step1x_export.bench.measure import measure
from step1x_export.bench.models import BenchModels, build_dit, build_vae, dit_inputs
from step1x_export.bench.preset import cap_fraction, quantize_24gb
from step1x_export.bench.step_pieces import caching_projection
from step1x_export.calibrate.collect import InputStats
from step1x_export.calibrate.qlinear import Kernel, QuantLinear
from step1x_export.calibrate.recipes import RECIPES, layer_scales
from step1x_export.precision import Precision
from step1x_export.runtime.options import RuntimeOptions
from step1x_export.step1x_ref.configs import get_config

GiB = 2**30
STEPS = ("env", "ladder", "context", "kernels", "preset_24gb", "caching")
# Full-size seconds (guesses for an H100 / H200, cold compiles included): what a step needs left of the budget to
# start, and where it is stopped. The budget (330 s) plus the machine's start fits one rerun in 15 minutes.
NEED_S = {"env": 0, "ladder": 150, "context": 0, "kernels": 30, "preset_24gb": 70, "caching": 15}
LIMIT_S = {"env": 30, "ladder": 190, "context": 15, "kernels": 60, "preset_24gb": 110, "caching": 40}
ROWS = (17664, 17340)  # 2 x (640 + 2 x 4096) at 1024^2; 2 x (640 + 2 x 4015) at 1168x880 (17340 % 256 = 188)
# Eager blocks + graphs: compiled blocks keep the SDPA kernel of their first trace, so each kernel is measured
# where its context decides it (eager, then captured); the compiled default's own choice is recorded per row.
ATTENTION_ROWS = tuple(LadderRow(f"{k} attention, graphs", {"attention": k, "compile": False},
                                 f"eager blocks + CUDA graphs, SDPA on {k}") for k in ("flash", "efficient", "cudnn"))
BOTH_SIZES = ("+ compile", "+ CUDA graphs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "first_light_out")))
    p.add_argument("--model", default="v1.1", help="full-size config; 'tiny' for a CPU dry run")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--size", type=int, default=None, help="DiT step / edit size (default 1024; tiny 32)")
    p.add_argument("--size2", type=int, default=None, help="the non-round second size (default 1168; tiny 48)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"which steps, in order ({', '.join(STEPS)})")
    p.add_argument("--budget-s", type=float, default=330.0, help="steps that would start past this are skipped")
    p.add_argument("--limit-s", action="append", default=[], metavar="NAME=S", help="stop step NAME after S s")
    p.add_argument("--ladder-steps", type=int, default=4, help="timed denoising steps per ladder row")
    p.add_argument("--compile-cpu", action="store_true", help="CPU dry run: compile the ladder's rows too (slow)")
    p.add_argument("--inject", action="append", default=[], metavar="NAME:raise|hang",
                   help="dry runs: make step NAME raise or hang, to see every other row still reported")
    args = p.parse_args(argv)
    args.tiny = get_config(args.model).tiny_qwen is not None
    args.size = args.size or (32 if args.tiny else 1024)
    args.size2 = args.size2 or (48 if args.tiny else 1168)
    args.scale = 0.0 if args.tiny else 1.0
    names = args.steps.split(",")
    limits = dict(item.split("=", 1) for item in args.limit_s)
    injected = dict(item.split(":", 1) for item in args.inject)
    for what, given in (("step", names), ("--limit-s step", limits), ("--inject step", injected)):
        if unknown := set(given) - set(STEPS):
            p.error(f"unknown {what}(s) {sorted(unknown)}; choose from {', '.join(STEPS)}")
    if bad := {v for v in injected.values()} - {"raise", "hang"}:
        p.error(f"--inject takes NAME:raise or NAME:hang, got {sorted(bad)}")
    args.limits = {n: float(limits.get(n, LIMIT_S[n] if not args.tiny else 120)) for n in STEPS}
    args.injected = injected
    return args


# -- env / context ---------------------------------------------------------------------------------------
def context_gib(device: torch.device) -> dict[str, Any]:
    """Driver-used minus torch-reserved memory: the CUDA context and the libraries' own memory."""
    if device.type != "cuda":
        return {"status": f"ok ({SKIP_CUDA} for the context size)"}
    torch.zeros(1, device=device)  # the context and the first kernel
    free_b, total_b = torch.cuda.mem_get_info(device)
    return {"context_gib": (total_b - free_b - torch.cuda.memory_reserved(device)) / GiB, "total_gib": total_b / GiB}


def env_step(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, **context_gib(device)}
    if device.type == "cuda":
        out |= {"capability": list(torch.cuda.get_device_capability(device)), "cudnn": torch.backends.cudnn.version(),
                "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    return out


# -- ladder ----------------------------------------------------------------------------------------------
def _dit_models(config, device, dtype) -> BenchModels:
    return BenchModels(config=config, dit=build_dit(config, device, dtype, seed=0),
                       ae=build_vae(config, device, torch.float32, seed=1), mllm=None, device=device, dtype=dtype,
                       vae_dtype=torch.float32)


KEEP = ("row", "size", "status", "median_ms", "p10_ms", "p90_ms", "first_call_ms", "speedup", "rel_err_fp32",
        "compiles", "graphs_captured", "sdpa", "note", "error")


def ladder_step(config, device, dtype, args, report: CheckReport, deadline: float) -> dict[str, Any]:
    models = _dit_models(config, device, dtype)
    base = RuntimeOptions(precision=Precision.BF16 if dtype == torch.bfloat16 else Precision.FP32)
    settings = LadderSettings(base=base, steps=args.ladder_steps, compile_on_cpu=args.compile_cpu, deadline=deadline)
    sizes = {s: dit_inputs(config, s, args.ladder_steps + 1, device) for s in (args.size, args.size2)}
    state, cells = ModelState(), []
    state.calibration = [sizes[args.size]]

    def keep(result) -> None:
        cells.append({k: result.to_dict().get(k) for k in KEEP})
        report.partial(cells=cells)

    fp8 = next(r for r in LADDER if r.name == "+ FP8 GEMMs")
    # The eager row is the reference (fp32 predictions, eager latent and ms per size); the later rows join it.
    run_ladder(models, list(sizes.values()), settings, rows=(LADDER[0], *(r for r in LADDER if r.name in BOTH_SIZES)),
               on_result=keep, state=state)
    for row, x in [(r, sizes[args.size]) for r in ATTENTION_ROWS] + [(fp8, x) for x in sizes.values()]:
        keep(run_cell(row, models, x, state, settings))
    compiles = {row: sum(c["compiles"] for c in cells if c["row"] == row and c["status"] == "ok")
                for row in (*BOTH_SIZES, fp8.name)}
    return {"cells": cells, "sizes": list(sizes), "compiles_over_sizes": compiles}


# -- kernels ---------------------------------------------------------------------------------------------
def _layer(k: int, n: int, m: int, device: torch.device, dtype: torch.dtype) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(k + n)
    linear = nn.Linear(k, n, device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=k**-0.5)
    # Outlier channels, as the DiT's activations have (calibration scales follow the largest).
    x = torch.randn(m, k, device=device, dtype=dtype) * torch.linspace(0.2, 4.0, k, device=device, dtype=dtype)
    return linear, x


def _quantized(linear: nn.Linear, x: torch.Tensor, recipe: str) -> QuantLinear:
    s = layer_scales(linear, InputStats(x.float().abs().amax(0)), RECIPES[recipe], alpha=0.5, per_channel=True)
    return QuantLinear.from_linear(linear, RECIPES[recipe].fmt, input_scale=s.input_scale,
                                   weight_scale=s.weight_scale, smooth=s.smooth)


def shipped_layer(q: QuantLinear, x: torch.Tensor, timed: bool, compiled: bool = False) -> dict[str, Any]:
    """The layer's kernel on bf16 rows vs its exact emulation (same bf16 input), and its timings (compiled too
    on the widest layer: each compile costs seconds)."""
    if q.kernel is Kernel.EMULATE:
        return {"status": SKIP_CUDA}
    with torch.inference_mode():
        got = q(x).float()
        emulated = q.use_kernel(Kernel.EMULATE)(x).float()
        q.use_kernel(None)
    return {"kernel": q.kernel.value, "rel_err_vs_emulation": rel_err(got, emulated),
            **(shipped_layer_ms(q, x, compiled=compiled) if timed else {})}


def fast_accum(q: QuantLinear, x: torch.Tensor) -> dict[str, Any]:
    """FP8 `_scaled_mm` with and without fast accumulation, each vs the exact emulation."""
    if q.kernel is not Kernel.SCALED_MM:
        return {"status": SKIP_CUDA}
    from step1x_export.calibrate.qlinear import quantize_activation

    out: dict[str, Any] = {}
    with torch.inference_mode():
        emulated = q.use_kernel(Kernel.EMULATE)(x).float()
        q.use_kernel(None)
        xq = quantize_activation(x, q._act_mul, q.fmt)
        scale_a = q.input_scale.reshape(1, 1).repeat(x.shape[0], 1)

        def mm(fast: bool) -> torch.Tensor:
            return torch._scaled_mm(xq, q.weight.t(), scale_a=scale_a, scale_b=q.weight_scale.reshape(1, -1),
                                    bias=q.bias, out_dtype=torch.bfloat16, use_fast_accum=fast)

        for fast in (True, False):
            out[f"rel_err_fast_accum_{fast}"] = rel_err(mm(fast).float(), emulated)
            out[f"ms_fast_accum_{fast}"] = measure("mm", lambda f=fast: mm(f), device=x.device, runs=5).median_ms
    return out


def kernels_step(config, device: torch.device, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    h = config.dit.hidden_size
    mlp = int(h * config.dit.mlp_ratio)
    shapes = {"linear1": (h, 3 * h + mlp), "linear2": (h + mlp, h), "mlp_out": (mlp, h)}
    out: dict[str, Any] = {}
    for name, (k, n) in shapes.items():
        for m in ROWS[:1] if name != "linear1" else ROWS:  # M % 256 != 0 once, on the widest layer
            linear, x = _layer(k, n, 64 if tiny else m, device, dtype)
            fp8, int8 = _quantized(linear, x, "fp8"), _quantized(linear, x, "int8-sq")
            timed, compiled = m == ROWS[0], m == ROWS[0] and name == "linear1"
            cell = {"fp8": shipped_layer(fp8, x, timed, compiled), "int8": shipped_layer(int8, x, timed, compiled)}
            if m == ROWS[0] and name != "linear1":
                cell["fp8"]["fast_accum"] = fast_accum(fp8, x)
            if m == ROWS[0] and name == "linear1":
                cell["int8"]["epilogue"] = compiled_int8_form(int8, x).to_dict() \
                    if int8.kernel is Kernel.INT_MM else {"status": SKIP_CUDA}
            out[f"{name}@{m}"] = cell
            del linear, x, fp8, int8
            free(device)
    out["status"] = "ok" if device.type == "cuda" else f"ok ({SKIP_CUDA}: emulation only)"
    return out


# -- the 24gb preset under a 24 GB card's cap ------------------------------------------------------------
def preset_step(config, device, dtype, args, context_bytes: int) -> dict[str, Any]:
    from step1x_export.bench.models import build_mllm_with_processor
    from step1x_export.bench.runtimes import Shared, bench_picture, bench_runtime
    from step1x_export.plan.plan import make_plan
    from step1x_export.runtime.engines.mllm import prepare_mllm
    from step1x_export.runtime.engines.torch_engine import TorchEncoder

    torch._dynamo.reset()  # nothing compiled by earlier steps (or the modules it saw) stays under the cap
    free(device)
    models = _dit_models(config, device, dtype)
    out: dict[str, Any] = {"quant": quantize_24gb(models, dit_inputs(config, args.size, 2, device))}
    encoder = TorchEncoder(prepare_mllm(build_mllm_with_processor(config, device, dtype), "int8"))
    free(device)
    if device.type == "cuda":
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        total = torch.cuda.mem_get_info(device)[1]
        fraction = cap_fraction(context_bytes, total)
        out |= {"cap_gib": fraction * total / GiB, "context_gib": context_bytes / GiB, "expandable_segments": True}
        allocated = torch.cuda.memory_allocated(device)
        if allocated >= fraction * total:
            raise RuntimeError(f"{allocated / GiB:.2f} GiB allocated before the edit, at or over the "
                               f"{fraction * total / GiB:.2f} GiB cap")
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.reset_peak_memory_stats(device)
    options = RuntimeOptions(precision=Precision.BF16 if dtype == torch.bfloat16 else Precision.FP32,
                             cuda_graphs=False, mllm_quant="int8", compile=None if device.type == "cuda" else False)
    try:
        with bench_runtime(models, options, Shared(encoder)) as rt:
            t0 = time.perf_counter()
            rt.edit(bench_picture(args.size), "make the sky blue", seed=0, steps=4, size_level=args.size)
            peak = rt.peak_memory
            out |= {"wall_s": time.perf_counter() - t0, "peak": peak.what,
                    "peak_gib": None if peak.bytes is None else peak.bytes / GiB,
                    "driver_peak_gib": None if peak.driver_bytes is None else peak.driver_bytes / GiB,
                    "stage_s": rt.timings}
            if device.type == "cuda":
                out["reserved_peak_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    if not args.tiny:
        out["plan_gib"] = make_plan(args.model, args.size, preset="24gb").total / GiB
    return out


# -- the table ---------------------------------------------------------------------------------------------
def summary(entry: dict[str, Any]) -> str:
    """A few headline figures of one step, whatever it reached (the JSON has everything)."""
    figures: list[str] = []
    for c in entry.get("cells") or []:
        if c.get("median_ms") is not None:
            sdpa = f" {c['sdpa'][0]}" if c.get("sdpa") else ""
            figures.append(f"{c['row']}@{c.get('size')}: {c['median_ms']:.0f}ms{sdpa}")
    for pattern, x in (entry.get("projected_speedup") or {}).items():
        figures.append(f"{pattern} x{x:.2f}")
    for key in ("compiles_over_sizes", "context_gib", "peak_gib", "reserved_peak_gib", "driver_peak_gib",
                "plan_gib", "error"):
        if entry.get(key) is not None:
            value = entry[key]
            figures.append(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(figures)


def markdown(entries: list[dict[str, Any]]) -> str:
    lines = ["| step | status | s | headline |", "|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e.get('name')} | {str(e.get('status'))[:40]} | {e.get('elapsed_s') or 0:.0f} | "
                     f"{summary(e)} |")
    return "\n".join(lines)


def injected(name: str, how: str | None, run):
    """The step as asked for a dry run: itself, one that raises, or one that never ends."""
    if how == "raise":
        def fail() -> dict[str, Any]:
            raise RuntimeError(f"injected failure in {name}")
        return fail
    if how == "hang":
        def hang() -> dict[str, Any]:
            while True:  # swallowing exceptions as a ladder cell does: the time limit must still stop it
                try:
                    time.sleep(0.05)
                except Exception:
                    continue
        return hang
    return run


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
    context = {"bytes": 0}

    def read_context(key: str) -> dict[str, Any]:
        out = env_step(device) if key == "env" else context_gib(device)
        context["bytes"] = int(out.get("context_gib", 0) * GiB)
        return out

    runs = {"env": lambda: read_context("env"),
            "ladder": lambda: ladder_step(config, device, dtype, args, report,
                                          time.monotonic() + args.limits["ladder"] - 10 * args.scale),
            "context": lambda: read_context("context"),
            "kernels": lambda: kernels_step(config, device, dtype, args.tiny),
            "preset_24gb": lambda: preset_step(config, device, dtype, args, context["bytes"]),
            "caching": lambda: caching_projection(build_dit(config, device, dtype, seed=0),
                                                  dit_inputs(config, args.size, 2, device), dtype,
                                                  runs=1 if args.tiny else 5)}
    for name in args.steps.split(","):
        run = injected(name, args.injected.get(name), runs[name])
        report.run(name, run, need_s=NEED_S[name] * args.scale, limit_s=args.limits[name])
        free(device)
    report.data["notes"].append(f"total wall time {time.monotonic() - start:.1f} s")
    report.save()
    print(table(report.data["entries"]))
    print()
    print(markdown(report.data["entries"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
