"""Per-stage latency of an edit: MLLM, connector, DiT step (x N), VAE encode/decode, and the whole edit.

Batch 1 with true CFG: the MLLM runs the instruction and "" (one vision pass), the connector and the DiT
run batch 2. The MLLM sees synthetic ids of the real length (no tokenizer can be downloaded); the whole
edit times that MLLM pass but denoises with the fixed benchmark embedding, so every figure of a run uses
the same DiT inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..choices import BENCH_STAGES
from ..step1x_ref.sampling import StepFn, denoise, guided_euler, unpack
from .measure import StageResult, measure, skipped
from .models import BenchModels, DiTInputs, dit_inputs, dit_step_fn, mllm_stage_fn

STAGES = BENCH_STAGES


@dataclass
class StageSettings:
    sizes: tuple[int, ...] = (512, 768, 1024)
    steps: int = 28  # denoising steps of an edit (DiT step x N is extrapolated from the median step)
    runs: int = 5
    warmup: int = 2
    guidance: float = 6.0
    stages: tuple[str, ...] = STAGES
    edit_sizes: tuple[int, ...] | None = None  # whole-edit timing only at these sizes (None: every size)

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; known: {', '.join(STAGES)}")


def bench_image(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A smooth, O(1) image in [-1, 1], [1, 3, size, size] (the VAE's input range)."""
    ramp = torch.linspace(-1, 1, size)
    img = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                       (ramp[None, :] * ramp[:, None])])
    return img[None].to(device, dtype)


def whole_edit_fn(models: BenchModels, inputs: DiTInputs, step: StepFn, guidance: float) -> Callable[[], Tensor]:
    """MLLM (cond + uncond) -> VAE encode -> len(timesteps)-1 DiT steps with CFG -> VAE decode."""
    if models.ae is None:
        raise ValueError("whole edit: the VAE was not built (with_vae=False)")
    mllm = mllm_stage_fn(models.mllm) if models.mllm is not None else None
    image = bench_image(inputs.size, models.device, models.vae_dtype)
    truncate = models.config.cfg_truncate

    @torch.inference_mode()
    def run() -> Tensor:
        if mllm is not None:
            mllm()
        models.ae.encode(image)
        latent = denoise(guided_euler(step), inputs.noise, inputs.ref, inputs.timesteps,
                         guidance=guidance, truncate=truncate)
        return models.ae.decode(unpack(latent, inputs.size, inputs.size).to(models.vae_dtype))

    return run


StageFn = Callable[[], object]


def _size_stages(models: BenchModels, x: DiTInputs, s: StageSettings) -> Iterable[tuple[str, StageFn | str]]:
    """(stage, callable) or (stage, reason it cannot run) for one size."""
    dtype, dev = models.dtype, models.device
    emb, mask, t = x.llm_embedding.to(dtype), x.llm_mask, x.t.to(dtype)
    if "connector" in s.stages:
        yield "connector", lambda: models.dit.connector(emb, t, mask)
    if "dit_step" in s.stages:
        step, img = dit_step_fn(models.dit, x, dtype), x.img
        yield "dit_step", lambda: step(img, x.t)
    vae_missing = "skipped: VAE not built"
    if "vae_encode" in s.stages:
        image = bench_image(x.size, dev, models.vae_dtype)
        yield "vae_encode", (lambda: models.ae.encode(image)) if models.ae is not None else vae_missing
    if "vae_decode" in s.stages:
        latent = torch.randn(1, 16, x.size // 8, x.size // 8, device=dev, dtype=models.vae_dtype)
        yield "vae_decode", (lambda: models.ae.decode(latent)) if models.ae is not None else vae_missing
    if "edit" in s.stages and (s.edit_sizes is None or x.size in s.edit_sizes):
        if models.ae is None:
            yield "edit", vae_missing
        else:
            yield "edit", whole_edit_fn(models, x, dit_step_fn(models.dit, x, dtype), s.guidance)


def run_stages(models: BenchModels, settings: StageSettings, *, progress: Callable[[str], None] | None = None,
               hooks: dict[str, Callable[[], object]] | None = None) -> list[StageResult]:
    """Every stage at every size; a stage that raises is reported `failed` with its error, the rest go on.

    `hooks` replaces a stage's callable by name (tests use it to inject a failure).
    """
    hooks = hooks or {}
    results: list[StageResult] = []

    def run(stage: str, fn: Callable[[], object] | str, size: int | None, note: str = "") -> None:
        if progress is not None:
            progress(f"{stage} {size or ''}".strip())
        if isinstance(fn, str):
            results.append(skipped(stage, size, fn))
            return
        fn = hooks.get(stage, fn)
        with torch.inference_mode():
            results.append(measure(stage, fn, device=models.device, size=size, warmup=settings.warmup,
                                   runs=settings.runs, note=note))

    if "mllm" in settings.stages:
        # Size-independent: the processor resizes every image to 256-324 merged vision tokens.
        if models.mllm is None:
            results.append(skipped("mllm", None, "skipped: MLLM not built"))
        else:
            run("mllm", mllm_stage_fn(models.mllm), None, "vision once + LM cond/uncond")
    for size in settings.sizes:
        try:
            x = dit_inputs(models.config, size, settings.steps, models.device)
        except Exception as err:  # a bad size fails its rows, not the run
            results += [StageResult(stage=st, size=size, status="failed", error=f"inputs: {err}")
                        for st in settings.stages if st != "mllm"]
            continue
        for stage, fn in _size_stages(models, x, settings):
            note = f"{settings.steps} steps" if stage == "edit" else ""
            run(stage, fn, size, note)
            r = results[-1]
            if stage == "dit_step":
                r.extra = {"tokens": x.tokens, "batch": 2, "steps": settings.steps}
                if r.median_ms is not None:
                    r.extra["denoise_est_ms"] = settings.steps * r.median_ms  # extrapolated, not measured
    return results
