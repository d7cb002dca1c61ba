"""The GPU benchmark in one device call: full-size Step1X-Edit with random weights, the stage timings, the
ablation ladder at 512² and 1024² (each row a `Step1XEditRuntime` built from `RuntimeOptions`), the MLLM,
and a whole edit at 512² through the runtime in the best configuration that ran (FP8 when it did).

    OUT=/some/dir bash benchmarks/device_ladder.sh            # what the device tool runs (repo root, $OUT set)

The wrapper puts the checkout on PYTHONPATH (the package need not be installed there).

Budgeted to finish in under 8 minutes: each ladder row times a few denoising steps (--ladder-steps) and the
per-edit time is extrapolated as 28 x the median step (labelled so); the whole edit is measured for real only
at --edit-size. Every phase is in try/except and the JSON is rewritten after each one, so a failure or a
timeout still leaves the figures gathered so far under $OUT. The short tables are printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from step1x_export.bench.environment import environment_info
from step1x_export.bench.ladder import LADDER, LadderResult, LadderSettings, ModelState, row_options, run_ladder
from step1x_export.bench.measure import measure, short_error
from step1x_export.bench.models import (
    BenchModels,
    activation_check,
    build_dit,
    build_mllm,
    build_mllm_with_processor,
    build_vae,
    dit_inputs,
)
from step1x_export.bench.report import (
    BenchReport,
    activation_lines,
    ladder_table,
    plot_ladder,
    stages_table,
    write_csv,
    write_json,
)
from step1x_export.bench.run import BenchConfig
from step1x_export.bench.runtimes import bench_picture, bench_runtime
from step1x_export.bench.stages import StageSettings, run_stages
from step1x_export.runtime.engines.torch_engine import TorchEncoder
from step1x_export.runtime.options import RuntimeOptions
from step1x_export.step1x_ref.configs import get_config

# The project's speed targets (H200 absolutes; on an H100 the same ratios to the eager reference apply)
TARGETS = (
    ("+ compile", 1024, 500.0, 1.48, "bf16 lossless <= 0.50 s/step (>= 1.48x)"),
    ("+ CUDA graphs", 1024, 500.0, 1.48, "bf16 lossless <= 0.50 s/step (>= 1.48x)"),
    ("+ FP8 GEMMs", 1024, 370.0, 2.0, "FP8 W8A8 <= 0.37 s/step (>= 2.0x)"),
    ("+ FP8 attention", 1024, 300.0, 2.45, "FP8 + FP8 attention <= 0.30 s/step (>= 2.45x)"),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    p.add_argument("--model", default="v1.1", help="full-size config (v1.0 / v1.1); 'tiny' for a dry run")
    p.add_argument("--sizes", default="512,1024", help="ladder and stage sizes")
    p.add_argument("--ladder-steps", type=int, default=4, help="DiT steps timed per ladder row")
    p.add_argument("--runs", type=int, default=3, help="timed runs per stage")
    p.add_argument("--steps", type=int, default=28, help="steps of a whole edit")
    p.add_argument("--edit-size", type=int, default=512, help="size of the measured whole edit (0: none)")
    p.add_argument("--budget-s", type=float, default=390.0, help="ladder rows starting after this are skipped")
    p.add_argument("--compile-mode", default=None, help="RuntimeOptions.compile_mode (default: inductor's default, "
                   "as the CLI ships)")
    p.add_argument("--graph-cache", type=int, default=RuntimeOptions().graph_cache, help="RuntimeOptions.graph_cache")
    p.add_argument("--vae-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-mllm", action="store_true", help="skip the Qwen2.5-VL-7B-shaped MLLM (16 GB)")
    p.add_argument("--compile-cpu", action="store_true", help="run the '+ compile' row on CPU too (dry runs)")
    return p.parse_args()


def log(msg: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)


def main() -> int:
    args = parse_args()
    start = time.monotonic()
    if not torch.cuda.is_available() and args.model not in ("tiny", "tiny-v1.0"):
        print("no CUDA device: this script is for the GPU machine (use --model tiny for a CPU dry run)")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
    sizes = tuple(int(s) for s in args.sizes.split(","))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    vae_dtype = torch.float32 if args.vae_dtype == "fp32" else torch.bfloat16
    cfg = BenchConfig(model=args.model, device=str(device), precision="bf16", sizes=sizes, steps=args.steps,
                      runs=args.runs, warmup=1, ladder_steps=args.ladder_steps,
                      runtime=RuntimeOptions(compile_mode=args.compile_mode, graph_cache=args.graph_cache),
                      budget_s=args.budget_s, with_mllm=not args.no_mllm, compile_on_cpu=args.compile_cpu)
    report = BenchReport(env=environment_info(device), conditions=cfg.conditions(),
                         config={**asdict(cfg), "script": "benchmarks/device_ladder.py", "argv": sys.argv[1:]})
    report.conditions["vae"] = args.vae_dtype

    def save() -> None:
        write_json(report, out / "bench.json")

    def phase(name: str, fn) -> object:
        log(name, start)
        try:
            return fn()
        except Exception as err:  # record and go on: one failure must not cost the whole device call
            report.notes.append(f"{name} failed: {short_error(err)}")
            traceback.print_exc()
            return None
        finally:
            save()

    config = get_config(args.model)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    dit = build_dit(config, device, dtype, seed=0)
    ae = build_vae(config, device, vae_dtype, seed=1)
    report.notes.append(f"DiT {sum(p.numel() for p in dit.parameters()) / 1e6:,.1f} M params + VAE built on "
                        f"{device} in {time.perf_counter() - t0:.1f} s (random weights)")
    models = BenchModels(config=config, dit=dit, ae=ae, mllm=None, device=device, dtype=dtype, vae_dtype=vae_dtype)
    inputs = {s: dit_inputs(config, s, args.ladder_steps, device) for s in sizes}

    for s, x in inputs.items():
        check = phase(f"activation check {s}", lambda x=x: activation_check(dit, x, dtype))
        if check:
            report.activations.append(check)
    stage_settings = StageSettings(sizes=sizes, steps=args.steps, runs=args.runs, warmup=1,
                                   stages=("connector", "dit_step", "vae_encode", "vae_decode"))
    report.stages = phase("eager stages", lambda: run_stages(models, stage_settings)) or []

    # The ladder: leaves 60 s of the budget for the MLLM and the whole FP8 edit.
    settings = LadderSettings(base=cfg.base_options(), steps=args.ladder_steps, full_steps=args.steps,
                              compile_on_cpu=args.compile_cpu,
                              deadline=start + args.budget_s - 60, min_cell_s=20)
    state = ModelState()

    def keep(r: LadderResult) -> None:  # each cell is saved as it lands: a timeout keeps the rows before it
        report.ladder.append(r)
        save()
        log(f"ladder {r.row} {r.size}: {r.status} {r.median_ms or ''} {r.error or ''}", start)

    phase("ladder", lambda: run_ladder(models, list(inputs.values()), settings, rows=LADDER, state=state,
                                       on_result=keep))
    plot = phase("chart", lambda: plot_ladder(report, out / "bench_ladder.png"))
    if plot:
        report.notes.append(plot)

    if not args.no_mllm:
        models.mllm = phase("build MLLM (Qwen2.5-VL-7B shape, random)", lambda: build_mllm(config, device, dtype))
        if models.mllm is not None:
            mllm_rows = phase("mllm stage", lambda: run_stages(
                models, StageSettings(sizes=(), runs=args.runs, warmup=1, stages=("mllm",))))
            report.stages = (mllm_rows or []) + report.stages

    if args.edit_size and time.monotonic() - start < args.budget_s + 60:
        best = next((r for r in reversed(LADDER) if r.quant == state.quantized and any(
            x.row == r.name and x.status == "ok" for x in report.ladder)), None)
        if best is not None:
            phase(f"whole edit {args.edit_size} with '{best.name}'",
                  lambda: whole_edit(report, models, row_options(best, settings), best.name, args, device))
    _reference_estimate(report, args)
    report.notes.append(f"total wall time {time.monotonic() - start:.1f} s")
    save()
    for name, rows in (("stages", report.stages), ("ladder", report.ladder)):
        if rows:
            write_csv(rows, out / f"bench_{name}.csv", report)
    print("\n".join(report.notes))
    print("\n".join(activation_lines(report)))
    print(stages_table(report))
    print()
    print(ladder_table(report))
    print()
    print("\n".join(_target_lines(report)))
    return 0


def whole_edit(report: BenchReport, models: BenchModels, options: RuntimeOptions, row: str,
               args: argparse.Namespace, device: torch.device) -> object:
    """One whole edit through `Step1XEditRuntime` (MLLM with its processor unless --no-mllm, VAE, the row's
    DiT configuration), all stages resident: warm-up edit (compile, capture), then two timed edits."""
    encoder = None
    models.mllm = None  # the stage timings' MLLM has no processor; this one does (same shape)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_mllm:
        encoder = TorchEncoder(build_mllm_with_processor(models.config, device, models.dtype))
    rt = bench_runtime(models, options, encoder)
    picture = bench_picture(args.edit_size)
    try:
        result = measure(f"edit ({row}, runtime, all stages resident)",
                         lambda: rt.edit(picture, "make the sky blue", steps=args.steps, size_level=args.edit_size),
                         device=device, size=args.edit_size, warmup=1, runs=2,
                         note=f"{args.steps} steps; MLLM {'stub' if encoder is None else 'included'}")
        result.extra = {"runtime": rt.stats().summary(), "options": str(rt.options)}
    finally:
        rt.close()
    report.stages.append(result)
    return result


def _reference_estimate(report: BenchReport, args: argparse.Namespace) -> None:
    """Reference whole edit at --edit-size, as a sum of measured eager parts (not measured in one piece:
    the ladder quantizes the DiT in place, so the eager model is gone by the time the edit runs)."""
    med = {(r.stage, r.size): r.median_ms for r in report.stages if r.status == "ok"}
    s = args.edit_size
    parts = [med.get(("mllm", None)), med.get(("vae_encode", s)), med.get(("dit_step", s)), med.get(("vae_decode", s))]
    if all(p is not None for p in parts):
        total = parts[0] + parts[1] + args.steps * parts[2] + parts[3]
        report.notes.append(f"eager bf16 whole edit at {s}px, summed from its stages (mllm + encode + "
                            f"{args.steps} x step + decode): {total / 1000:.2f} s (estimate)")


def _target_lines(report: BenchReport) -> list[str]:
    """Each speed target against this run. The speed-up ratio to the eager row of the same run is the verdict
    (it holds on H100 and H200 alike); the absolute ms figures are the H200 targets, shown for reference."""
    lines = [f"targets on {report.env['device']}:"]
    by = {(r.row, r.size): r for r in report.ladder}
    for row, size, ms, ratio, what in TARGETS:
        r = by.get((row, size))
        if r is None or r.median_ms is None:
            lines.append(f"  {what}: '{row}' at {size}px not measured ({_why(r)})")
            continue
        met = (r.speedup or 0) >= ratio and (r.lossless is not False)
        err = "n/a" if r.rel_err_fp32 is None else f"{100 * r.rel_err_fp32:.2f}%"
        lines.append(f"  {what}: {r.median_ms:.0f} ms/step (H200 target {ms:.0f}), {r.speedup or 0:.2f}x -> "
                     f"{'met' if met else 'MISSED'}; rel err vs fp32 {err}, lossless {r.lossless}, "
                     f"PSNR vs bf16 {r.psnr_db if r.psnr_db is None else round(r.psnr_db, 1)} dB")
    for r in report.stages:
        if r.stage.startswith("edit"):
            verdict = "n/a" if r.median_ms is None else ("met" if r.median_ms <= 2500 else "MISSED")
            lines.append(f"  whole edit <= 2.5 s at 512px (FP8): {r.stage} at {r.size}px: {r.median_ms} ms -> "
                         f"{verdict}; peak {r.peak_mem_gb} GB (target <= 24 GB at 1024px) [{_why(r)}]")
    return lines


def _why(r: object | None) -> str:
    if r is None:
        return "no row"
    error = getattr(r, "error", None)
    return f"{r.status}: {error}" if error else (getattr(r, "note", "") or r.status)


if __name__ == "__main__":
    sys.exit(main())
