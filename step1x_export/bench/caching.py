"""Step caching in the benchmark: per cache setting, the denoising time, DiT calls computed vs reused, and the
final latent's PSNR against the same loop without a cache (the runtime's `CachedStep`, the same inputs)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..runtime.engines.torch_engine import TorchEngine
from ..runtime.step.caching import CachedStep, CacheSpec
from ..runtime.step.engine_step import engine_step_fn
from ..specs import dit_spec
from ..step1x_ref.configs import ModelConfig
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.sampling import StepFn, denoise, guided_euler
from .ladder import psnr
from .measure import synchronize
from .models import DiTInputs


@dataclass
class CacheRow:
    cache: str  # "none" or the CacheSpec
    size: int
    steps: int
    s_per_edit: float  # median denoising seconds
    computed: int
    reused: int
    latent_psnr_db: float  # vs "none"; inf when identical


def _denoise(step: StepFn, x: DiTInputs, truncate: float) -> torch.Tensor:
    return denoise(guided_euler(step), x.noise, x.ref, x.timesteps, guidance=6.0, truncate=truncate,
                   conditioning=x.conditioning)


def cache_rows(model: Step1XEdit, config: ModelConfig, inputs: DiTInputs, specs: list[CacheSpec], dtype: torch.dtype,
               runs: int = 1) -> list[CacheRow]:
    """The uncached loop first (the reference), then one row per cache setting; eager, `runs` timed loops each."""
    device = inputs.noise.device
    engine = TorchEngine(model, dit_spec(config), dtype, device)
    steps = len(inputs.timesteps) - 1
    rows: list[CacheRow] = []
    reference: torch.Tensor | None = None
    for spec in [None, *specs]:
        v1p2 = bool(inputs.text)  # its one masked CFG call; the rule reads the cond branch
        cached = CachedStep(engine, spec, masked=v1p2, cond_signal=v1p2) if spec is not None else None
        seconds = []
        for _ in range(runs):
            if cached is not None:
                cached.begin(steps)
            synchronize(device)
            t0 = time.perf_counter()
            latent = _denoise(cached or inputs.step_over(engine_step_fn(engine)), inputs, config.cfg_truncate)
            synchronize(device)
            seconds.append(time.perf_counter() - t0)
        reference = latent if reference is None else reference
        stats = cached.stats if cached is not None else None
        rows.append(CacheRow(str(spec) if spec else "none", inputs.size, steps, statistics.median(seconds),
                             stats.computed if stats else steps, stats.reused if stats else 0,
                             psnr(latent, reference)))
    return rows


def cache_table(rows: list[CacheRow]) -> str:
    lines = [f"{'cache':14} {'size':>5} {'steps':>5} {'s/edit':>8} {'computed':>8} {'reused':>6} {'latent PSNR':>11}"]
    for r in rows:
        p = "inf" if math.isinf(r.latent_psnr_db) else f"{r.latent_psnr_db:.2f}"
        lines.append(f"{r.cache:14} {r.size:>5} {r.steps:>5} {r.s_per_edit:>8.3f} {r.computed:>8} {r.reused:>6} "
                     f"{p:>11}")
    return "\n".join(lines)


def as_dicts(rows: list[CacheRow]) -> list[dict]:
    return [asdict(r) for r in rows]
