"""`step1x-export bench`: the latency harness and the ablation ladder on any machine (tiny model on CPU by default)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..choices import BENCH_STAGES as STAGES
from ..step1x_ref.configs import CONFIGS
from .common import DEVICE, SEED, FiniteFloat, check_output_path, default_device, user_errors
from .runtime_options import RuntimeArgs, runtime_options

if TYPE_CHECKING:
    from ..bench.run import BenchConfig


def _int_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _stage_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    stages = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise click.BadParameter(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    return stages


def _work_items(cfg: BenchConfig) -> int:
    """Rows the run will produce (the progress bar's total)."""
    from ..bench.ladder import LADDER

    per_size = [s for s in cfg.stages if s not in ("mllm", "edit")]
    edits = len(cfg.edit_sizes) if cfg.edit_sizes is not None else len(cfg.sizes)
    ladder = len(LADDER) * len(cfg.ladder_sizes or cfg.sizes) if cfg.ladder else 0
    return ("mllm" in cfg.stages) + len(per_size) * len(cfg.sizes) + ("edit" in cfg.stages) * edits + ladder


@click.command()
@click.option("--model", "model_name", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True,
              help="Config to build with RANDOM weights (v1.0/v1.1 are full size: 12 B DiT + 8 B MLLM, GPU only).")
@click.option("--device", type=DEVICE, default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="DiT/MLLM dtype of the stage timings and of the ladder's reference row (the VAE runs in fp32).")
@click.option("--sizes", callback=_int_list, default="64,96", show_default=True,
              help="Edit resolutions (square, multiples of 16), e.g. 512,768,1024 on a GPU.")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True,
              help="Denoising steps of an edit (whole-edit stage; DiT step x N is extrapolated from the median).")
@click.option("--runs", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Timed runs per stage (median, p10, p90 over these).")
@click.option("--warmup", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Untimed calls before the timed runs; the first one is reported as 'first call' (compile).")
@click.option("--stages", callback=_stage_list, default=",".join(STAGES), show_default=True,
              help="Stages to time.")
@click.option("--edit-sizes", callback=_int_list, default=None,
              help="Time the whole edit (--steps steps) only at these sizes [default: the smallest of --sizes].")
@click.option("--mllm/--no-mllm", default=True, show_default=True,
              help="Build and time the MLLM (full size: Qwen2.5-VL-7B shape, ~16 GB in bf16).")
@click.option("--ladder/--no-ladder", default=True, show_default=True,
              help="Run the ablation ladder: eager -> +compile -> +CUDA graphs (the default configuration) -> +FP8 "
                   "GEMMs -> +FP8 attention, each row a runtime built from RuntimeOptions.")
@click.option("--ladder-sizes", callback=_int_list, default=None, help="Ladder resolutions [default: --sizes].")
@click.option("--ladder-steps", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Denoising steps timed per ladder row (per-edit time is extrapolated to --steps).")
@click.option("--compile-cpu", is_flag=True, help="Also run the compile row on CPU (inductor builds C++: minutes).")
@click.option("--no-fp32-reference", "no_fp32_reference", is_flag=True,
              help="Skip the fp32 run of the same weights (no rel. error column; saves memory on small cards).")
@click.option("--budget-s", type=FiniteFloat(0.0, 1e7), default=None,
              help="Skip the remaining ladder rows once this many seconds have passed (reported as skipped).")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("bench_out"),
              show_default=True, help="Folder for bench.json, bench_stages.csv, bench_ladder.csv, bench_ladder.png "
              "(created; files written atomically).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Weight and noise seed.")
@click.option("--cache", "cache", default="teacache:0.2,teacache:0.4,teacache:0.6", show_default=True,
              help="Step-cache settings to time (comma-separated teacache[:T] / fbcache[:T]; '' for none): --steps "
                   "denoising steps at the smallest size each, with DiT calls computed vs reused and latent PSNR vs no "
                   "cache.")
@runtime_options(source=False, only=("compile_mode", "graph_cache", "threads"))
@user_errors
def bench(runtime: RuntimeArgs, model_name: str, device: str | None, precision: str, sizes: tuple[int, ...],
          steps: int, runs: int, warmup: int, stages: tuple[str, ...], edit_sizes: tuple[int, ...] | None, mllm: bool,
          ladder: bool, ladder_sizes: tuple[int, ...] | None, ladder_steps: int, compile_cpu: bool,
          no_fp32_reference: bool, budget_s: float | None, out_dir: Path, seed: int,
          cache: str) -> None:
    """Time every stage of an edit and walk the optimisation ladder, on random weights.

    Reports median, p10 and p90 over --runs, the first call (compile/capture) apart, peak GPU memory, and each
    ladder row's fidelity (one DiT step's relative error vs an fp32 run of the same weights; the final latent's
    PSNR vs the eager reference). The device, driver, library versions and conditions head every table.
    Rows that cannot run here (CUDA graphs and FP8 on CPU) are listed as skipped, failures with their error.
    """
    if not sizes:
        raise click.BadParameter("give at least one size", param_hint="--sizes")
    from tqdm import tqdm

    from ..bench.caching import CacheRow, cache_table
    from ..bench.report import activation_lines, ladder_table, stages_table, write_all
    from ..bench.run import BenchConfig, run_benchmark

    cfg = BenchConfig(
        model=model_name, device=device or default_device(), precision=precision, sizes=sizes, steps=steps,
        runs=runs, warmup=warmup, stages=stages, edit_sizes=edit_sizes or (min(sizes),), with_mllm=mllm, ladder=ladder,
        ladder_sizes=ladder_sizes, ladder_steps=ladder_steps, runtime=runtime.options(),
        compile_on_cpu=compile_cpu, fp32_reference=not no_fp32_reference, budget_s=budget_s, seed=seed,
        cache=tuple(c.strip() for c in cache.split(",") if c.strip()),
    )
    out_dir.mkdir(parents=True, exist_ok=True)  # the report's folder, made and checked before the long run
    check_output_path(out_dir / "bench.json")
    if CONFIGS[model_name].tiny_qwen is None and cfg.device == "cpu":
        raise click.UsageError(f"--model {model_name} is full size (12 B + 8 B parameters): run it on a GPU")
    with tqdm(total=_work_items(cfg), desc="bench", unit="row", leave=False) as bar:

        def log(msg: str) -> None:
            if msg.startswith(("stage ", "ladder ")):
                bar.set_postfix_str(msg, refresh=False)
                bar.update(1)
            else:
                bar.write(msg, file=sys.stderr)

        report = run_benchmark(cfg, log=log)
    for message in write_all(report, out_dir):
        click.echo(message, err=True)
    click.echo("\n".join(activation_lines(report)))
    click.echo(stages_table(report))
    if report.ladder:
        click.echo("")
        click.echo(ladder_table(report))
    if report.cache:
        click.echo("")
        click.echo(cache_table([CacheRow(**r) for r in report.cache]))
