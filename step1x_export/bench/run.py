"""One benchmark run: build the models, check activations, time every stage, climb the ladder, report.

`run_benchmark` is what `step1x-export bench` and `benchmarks/device_ladder.py` both call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..precision import Precision
from ..runtime.options import RuntimeOptions
from ..runtime.step.cache_spec import CacheSpec
from ..step1x_ref.configs import get_config
from ..threads import default_threads, torch_threads
from .caching import as_dicts, cache_rows
from .environment import environment_info
from .ladder import LADDER, LadderSettings, run_ladder
from .measure import short_error
from .models import activation_check, build_models, dit_inputs
from .report import BenchReport
from .stages import STAGES, StageSettings, run_stages


@dataclass
class BenchConfig:
    model: str = "tiny"
    device: str = "cpu"
    precision: str = "bf16"  # DiT / MLLM dtype of the stage timings and of the ladder (fp32 or bf16)
    sizes: tuple[int, ...] = (64, 96)
    steps: int = 28  # steps of an edit
    runs: int = 5
    warmup: int = 2
    stages: tuple[str, ...] = STAGES
    edit_sizes: tuple[int, ...] | None = None
    with_mllm: bool = True
    ladder: bool = True
    ladder_sizes: tuple[int, ...] | None = None  # default: `sizes`
    ladder_steps: int = 4  # timed denoising steps per ladder row
    # the runtime toggles every ladder row starts from (the command line's shared runtime flags: compile mode,
    # graph cache, threads); its precision is `precision`'s. Its threads run the stage timings too.
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    compile_on_cpu: bool = False
    fp32_reference: bool = True
    budget_s: float | None = None  # ladder cells are skipped once this much wall time has passed
    min_cell_s: float = 0.0
    seed: int = 0
    cache: tuple[str, ...] = ()  # step-cache settings timed on the smallest size ("teacache:0.2", "fbcache", ...)

    def __post_init__(self) -> None:
        if Precision.parse(self.precision) not in (Precision.BF16, Precision.FP32, Precision.FP16):
            raise ValueError(f"bench precision must be bf16, fp16 or fp32, got {self.precision!r} "
                             "(FP8 is a ladder row, not a base precision)")
        bad = [s for s in (*self.sizes, *(self.ladder_sizes or ())) if s <= 0 or s % 16]
        if bad:
            raise ValueError(f"benchmark sizes must be positive multiples of 16, got {bad}")
        for c in self.cache:
            CacheSpec.parse(c)  # a bad setting fails before any model is built
        if self.runs < 1 or self.warmup < 1 or self.steps < 1 or self.ladder_steps < 1:
            raise ValueError("runs, warmup, steps and ladder_steps must all be >= 1")

    @property
    def dtype(self) -> torch.dtype:
        return Precision.parse(self.precision).compute_dtype

    def base_options(self) -> RuntimeOptions:
        """The `RuntimeOptions` every ladder row starts from (`runtime` at this precision)."""
        return replace(self.runtime, precision=Precision.parse(self.precision))

    def threads(self) -> int | None:
        """torch's CPU threads for the whole run, as the runtime picks them for an edit (None: torch's own)."""
        small = get_config(self.model).tiny_qwen is not None
        return self.runtime.threads or default_threads(small_model=small, device_type=torch.device(self.device).type)

    def conditions(self) -> dict[str, object]:
        """The short form printed on every table (the full config goes to the JSON)."""
        return {
            "model": self.model, "precision": self.precision, "batch": "1 + CFG (DiT batch 2)",
            "steps/edit": self.steps, "runs": self.runs, "warmup": self.warmup,
            "ladder steps timed": self.ladder_steps if self.ladder else "-",
            "compile mode": self.runtime.compile_mode or "default", "threads": self.threads() or "torch's default",
            "weights": "random, seeded",
        }


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchReport:
    """Every stage and ladder row under the CPU threads the runtime would edit with (`BenchConfig.threads`)."""
    with torch_threads(cfg.threads()):
        return _run(cfg, log)


def _run(cfg: BenchConfig, log: Callable[[str], None]) -> BenchReport:
    start = time.monotonic()
    device = torch.device(cfg.device)
    report = BenchReport(env=environment_info(device), conditions=cfg.conditions(), config=asdict(cfg))
    log(f"building '{cfg.model}' with random weights on {device} ({cfg.precision})")
    t0 = time.perf_counter()
    models = build_models(cfg.model, device, dtype=cfg.dtype, with_mllm=cfg.with_mllm, with_vae=True, seed=cfg.seed)
    report.notes.append(f"models built in {time.perf_counter() - t0:.1f} s")
    ladder_sizes = cfg.ladder_sizes or cfg.sizes
    for size in sorted(set(cfg.sizes) | set(ladder_sizes if cfg.ladder else ())):
        try:
            report.activations.append(activation_check(models.dit, dit_inputs(models.config, size, cfg.steps, device),
                                                       models.dtype))
        except Exception as err:
            report.notes.append(f"activation check at {size}px failed: {short_error(err)}")
    stage_settings = StageSettings(sizes=cfg.sizes, steps=cfg.steps, runs=cfg.runs, warmup=cfg.warmup,
                                   stages=cfg.stages, edit_sizes=cfg.edit_sizes)
    report.stages = run_stages(models, stage_settings, progress=lambda s: log(f"stage {s}"))
    if cfg.ladder:
        settings = LadderSettings(
            base=cfg.base_options(), steps=cfg.ladder_steps, full_steps=cfg.steps,
            compile_on_cpu=cfg.compile_on_cpu, fp32_reference=cfg.fp32_reference,
            deadline=None if cfg.budget_s is None else start + cfg.budget_s, min_cell_s=cfg.min_cell_s,
        )
        inputs = [dit_inputs(models.config, s, cfg.ladder_steps, device) for s in ladder_sizes]
        report.ladder = run_ladder(models, inputs, settings, rows=LADDER,
                                   on_result=lambda r: log(f"ladder {r.row} {r.size}: {r.status}"))
    if cfg.cache:
        specs = [CacheSpec.parse(c) for c in cfg.cache]
        x = dit_inputs(models.config, min(cfg.sizes), cfg.steps, device)
        report.cache = as_dicts(cache_rows(models.dit, models.config, x, specs, models.dtype))
    report.notes.append(f"total wall time {time.monotonic() - start:.1f} s")
    return report
