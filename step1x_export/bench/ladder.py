"""The ablation ladder: reference eager, then one `RuntimeOptions` field more per row, each row a
`Step1XEditRuntime` over the same weights, with its own latency and fidelity figures on the same inputs.

A row is `RuntimeOptions` overrides (+ a quantization recipe): the runtime compiles, captures and quantizes
exactly as it does for `step1x-export edit`, so the ladder measures the product, not a copy of its toggles.
The row "+ CUDA graphs" is the default configuration (`RuntimeOptions()` as the CLI ships it); "+ FP8 GEMMs"
is that configuration with a calibration artifact (`--quant`).

Per row and size, two edits of K steps at size x size: the first pays compile and capture (`first_call_ms`
= its first step), the second is timed step by step (CUDA events on a GPU, via the runtime's step times).
Fidelity:
  rel_err_fp32  ||pred - pred_fp32|| / ||pred_fp32|| of one call of the row's DiT engine (noisy half only:
                the reference half is discarded), against an fp32 run of the same weights;
  psnr_db       PSNR of the final latent after the K steps vs the eager row's, peak = the reference's range.

Quantization swaps Linear layers in place and drops the float weights, so rows run in order, each at every
size before the next row, and the quantized rows come last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..precision import Precision
from ..runtime.options import RuntimeOptions
from ..runtime.step.attention import attention_context
from ..runtime.step.engine_step import engine_step_fn
from ..step1x_ref.dit.model import Step1XEdit
from .kernels import sdpa_kernels
from .measure import FAILED, NOT_IMPLEMENTED, OK, SKIPPED, peak_memory_gb, reset_peak_memory, short_error, synchronize
from .measure import percentile as _percentile

if TYPE_CHECKING:  # models imports the MLLM (transformers); the ladder only needs the types
    from ..calibrate.artifact import QuantArtifact
    from ..runtime.runtime import Step1XEditRuntime
    from .models import BenchModels, DiTInputs


@dataclass(frozen=True)
class LadderRow:
    name: str
    options: dict[str, Any]  # RuntimeOptions fields this row sets over the run's base options
    description: str
    quant: str | None = None  # calibration recipe applied to the DiT (the runtime's --quant), e.g. "fp8"

    @property
    def quantized(self) -> bool:
        return self.quant is not None or bool(self.options.get("attention_fp8"))


LADDER: tuple[LadderRow, ...] = (
    LadderRow("eager bf16", {"compile": False, "cuda_graphs": False}, "reference: eager PyTorch, bf16"),
    LadderRow("+ compile", {"compile": True, "cuda_graphs": False},
              "torch.compile of each DiT block, token count dynamic (fuses norm+modulation, RoPE, GELU, gates)"),
    LadderRow("+ CUDA graphs", {}, "the default configuration: compile (auto: on CUDA) + the whole step captured "
              "once per shape"),
    LadderRow("+ cuDNN attention", {"attention": "cudnn"}, "the default configuration with every attention on "
              "cuDNN's kernel (auto picks it first on Hopper; this row forces it anywhere)"),
    LadderRow("+ FP8 GEMMs", {"precision": Precision.FP8}, "the default configuration + an FP8 W8A8 artifact "
              "(E4M3 block GEMMs)", quant="fp8"),
    LadderRow("+ FP8 attention", {"precision": Precision.FP8, "attention_fp8": True}, "E4M3 attention", quant="fp8"),
)
DEFAULT_ROW = "+ CUDA graphs"


@dataclass
class LadderSettings:
    base: RuntimeOptions = field(default_factory=RuntimeOptions)  # every row's options before its overrides
    steps: int = 4  # K timed denoising steps per row (the figures' sample count)
    full_steps: int = 28  # per-edit estimate = full_steps x median step (extrapolated, not measured)
    guidance: float = 6.0
    compile_on_cpu: bool = False  # inductor on CPU builds C++ (tens of seconds even for the tiny model)
    fp32_reference: bool = True
    deadline: float | None = None  # time.monotonic() after which remaining cells are skipped
    min_cell_s: float = 0.0  # a cell starts only if this much time is left before the deadline

    @property
    def dtype(self) -> torch.dtype:
        return self.base.precision.compute_dtype


@dataclass
class LadderResult:
    row: str
    size: int
    status: str = OK
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # the RuntimeOptions that ran (resolved for the device)
    steps_timed: int = 0
    median_ms: float | None = None  # per denoising step (DiT batch 2 + CFG + Euler)
    p10_ms: float | None = None
    p90_ms: float | None = None
    first_call_ms: float | None = None  # the first edit's first step: compile / autotune / capture
    est_edit_s: float | None = None  # full_steps x median (extrapolated)
    speedup: float | None = None  # eager median / this median, same size, same run
    rel_err_fp32: float | None = None
    psnr_db: float | None = None
    lossless: bool | None = None  # rel_err_fp32 <= 1.1 x eager's (non-quantized rows)
    peak_mem_gb: float | None = None
    compiles: int = 0  # the runtime's stats after this cell
    graphs_captured: int = 0
    sdpa: list[str] = field(default_factory=list)  # the SDPA kernels one DiT call dispatched (aten op names)
    note: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Reference:
    fp32_pred: Tensor | None = None
    eager_latent: Tensor | None = None
    eager_rel_err: float | None = None
    eager_ms: float | None = None


@dataclass
class ModelState:
    quantized: str | None = None  # the recipe the shared DiT was quantized with (in place, for good)
    quant_note: str = ""
    calibration: list[DiTInputs] = field(default_factory=list)  # what the FP8 row calibrates on
    references: dict[int, _Reference] = field(default_factory=dict)
    traced_attention: str | None = None  # the attention choice the process's compiled blocks were traced under


# -- fidelity -------------------------------------------------------------------------------------------
def rel_err(x: Tensor, ref: Tensor) -> float:
    """||x - ref|| / ||ref||, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def max_rel_err(x: Tensor, ref: Tensor) -> float:
    """max |x - ref| / max |ref|: the worst element against the output's scale, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def psnr(x: Tensor, ref: Tensor) -> float:
    """PSNR in dB with the reference's range as peak; inf when equal."""
    ref, x = ref.float(), x.float()
    mse = float((x - ref).pow(2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@torch.inference_mode()
def fp32_reference_pred(model: Step1XEdit, inputs: DiTInputs, dtype: torch.dtype) -> Tensor:
    """One step in fp32 with the same weights: the model is upcast in place and cast back (bf16 -> fp32 -> bf16
    is exact), so no second copy of the weights is held."""
    from .models import dit_step_fn

    model.float()
    try:
        return dit_step_fn(model, inputs, torch.float32)(inputs.img, inputs.t)
    finally:
        model.to(dtype)


# -- rows ---------------------------------------------------------------------------------------------
def row_options(row: LadderRow, settings: LadderSettings) -> RuntimeOptions:
    """The row's `RuntimeOptions` (raises NotImplementedError for what the runtime cannot do yet)."""
    base = {f.name: getattr(settings.base, f.name) for f in fields(RuntimeOptions)}
    return RuntimeOptions(**{**base, **row.options})


def quantize(models: BenchModels, recipe: str, calibration: list[DiTInputs]) -> tuple[QuantArtifact, str]:
    """Calibrate `recipe` (step1x_export.calibrate's recipe: static activation scales from one eager step of
    each ladder input, per-channel weight scales, its layer selection) and apply it to the shared DiT in place,
    with the transform the runtime's --quant uses. Returns the artifact and what ran, for the row's note."""
    from ..calibrate.apply import quantize_model
    from ..calibrate.collect import StatsCollector
    from ..calibrate.recipes import build_artifact
    from .models import dit_step_fn

    model, dtype = models.dit, models.dtype
    collector = StatsCollector(model)
    with collector.active(), torch.inference_mode():
        for x in calibration:  # the measured inputs themselves: optimistic for fidelity, exact for speed
            dit_step_fn(model, x, dtype)(x.img, x.t)
    artifact = build_artifact(model, collector.stats, recipe, model_hash="bench-random-weights",
                              calibration={"source": "bench ladder inputs, one step each"})
    quantize_model(model, artifact, check_hash=False)  # no hash: hashing 24 GB of random weights proves nothing
    return artifact, (f"calibrate {recipe!r} recipe: {len(artifact.layers)} Linear layers, static activation "
                      f"scales from {len(calibration)} bench input(s)")


def unsupported(row: LadderRow, device: torch.device, settings: LadderSettings) -> tuple[str, str] | None:
    """(status, reason) when a row cannot run here, checked before any work."""
    try:
        options = row_options(row, settings)
    except NotImplementedError as err:
        return NOT_IMPLEMENTED, f"not implemented: {err}"
    cuda = device.type == "cuda"
    if (options.cuda_graphs or row.quant) and not cuda:
        return SKIPPED, "skipped: needs CUDA"
    if row.quant == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = torch.cuda.get_device_capability(device)
        return SKIPPED, f"skipped: FP8 GEMMs need compute capability >= 8.9, got {cap[0]}.{cap[1]}"
    if options.compile and not cuda and not settings.compile_on_cpu:
        return SKIPPED, "skipped: torch.compile on CPU is off (slow C++ builds; enable with --compile-cpu)"
    return None


def _dit_pred(rt: Step1XEditRuntime, x: DiTInputs) -> Tensor:
    """One call of the row's DiT engine (compiled / quantized as the runtime made it, under its attention choice)
    on the ladder inputs."""
    assert rt.stages is not None
    engine = rt.stages.load("dit")
    with torch.inference_mode(), attention_context(rt.options.attention, rt.device):
        return x.step_over(engine_step_fn(engine))(x.img, x.t, *x.conditioning)


def trace_afresh(options: RuntimeOptions, state: ModelState) -> bool:
    """Drop the process's compiled blocks when this row's attention differs from the one they were traced under
    (compiled blocks keep the SDPA kernel of their first trace: a "+ cuDNN attention" row would otherwise time
    the previous row's kernel). True when it dropped them."""
    if not options.compile:
        return False
    stale = state.traced_attention not in (None, options.attention)
    if stale:
        torch._dynamo.reset()
    state.traced_attention = options.attention
    return stale


# -- running ---------------------------------------------------------------------------------------------
def _fill_timing(result: LadderResult, step_ms: list[float], settings: LadderSettings) -> None:
    ms = sorted(step_ms)
    result.steps_timed = len(ms)
    result.median_ms = _percentile(ms, 50)
    result.p10_ms, result.p90_ms = _percentile(ms, 10), _percentile(ms, 90)
    result.est_edit_s = settings.full_steps * result.median_ms / 1000


def run_cell(row: LadderRow, models: BenchModels, x: DiTInputs, state: ModelState, settings: LadderSettings,
             *, reference: bool = False) -> LadderResult:
    """One row at one size through its own runtime. Any failure becomes the row's status; the ladder goes on."""
    from .runtimes import bench_picture, bench_runtime

    device = models.device
    result = LadderResult(row=row.name, size=x.size, description=row.description)
    ref = state.references.setdefault(x.size, _Reference())
    if (why := unsupported(row, device, settings)) is not None:
        result.status, result.note = why
        return result
    if settings.deadline is not None and time.monotonic() + settings.min_cell_s > settings.deadline:
        result.status, result.note = SKIPPED, "skipped: time budget of the run spent"
        return result
    rt = None
    try:
        if row.quant != state.quantized:
            if state.quantized is not None:
                raise ValueError(f"the DiT is already quantized with {state.quantized!r}: order quantized rows last")
            state.quant_note = quantize(models, row.quant, state.calibration or [x])[1]  # type: ignore[arg-type]
            state.quantized = row.quant
        result.note = state.quant_note if row.quant else ""
        options = row_options(row, settings)
        trace_afresh(options.resolved(device), state)
        rt = bench_runtime(models, options)
        result.options = {k: getattr(rt.options, k) for k in row.options} | {
            "compile": rt.options.compile, "cuda_graphs": rt.options.cuda_graphs, "threads": rt.options.threads}
        picture = bench_picture(x.size)

        def edit() -> list[float]:
            rt.edit(picture, "", seed=0, steps=settings.steps, cfg=settings.guidance, size_level=x.size)
            return rt.stats().step_ms

        synchronize(device)
        reset_peak_memory(device)
        result.first_call_ms = edit()[0]  # compile, autotune and capture land in the first step
        step_ms = edit()
        _fill_timing(result, step_ms, settings)
        result.peak_mem_gb = peak_memory_gb(device)
        latent = rt.last_latent
        result.sdpa = sdpa_kernels(lambda: _dit_pred(rt, x))  # as compiled / eager in this row, not captured
        pred = _dit_pred(rt, x).float()
        stats = rt.stats()
        result.compiles, result.graphs_captured = stats.compiles, stats.graphs_captured
        n = x.noise.shape[1]
        if ref.fp32_pred is not None:
            result.rel_err_fp32 = rel_err(pred[:, :n], ref.fp32_pred[:, :n])
        if reference:
            ref.eager_latent, ref.eager_rel_err, ref.eager_ms = latent, result.rel_err_fp32, result.median_ms
        elif ref.eager_latent is not None and latent is not None:
            result.psnr_db = psnr(latent, ref.eager_latent)
        if ref.eager_ms and result.median_ms:
            result.speedup = ref.eager_ms / result.median_ms
        if not row.quantized and ref.eager_rel_err is not None and result.rel_err_fp32 is not None:
            result.lossless = result.rel_err_fp32 <= max(1.1 * ref.eager_rel_err, 1e-5)  # floor: fp32 rows
    except Exception as err:  # one failed row is a row of the table, not the end of the run
        result.status, result.error = FAILED, short_error(err)
    finally:
        if rt is not None:
            rt.close()  # frees its graphs and hands the DiT back uncompiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def run_ladder(
    models: BenchModels,
    inputs: list[DiTInputs],
    settings: LadderSettings,
    *,
    rows: tuple[LadderRow, ...] = LADDER,
    on_result: Callable[[LadderResult], None] | None = None,
    state: ModelState | None = None,
) -> list[LadderResult]:
    """Every row at every size, rows outer (quantization changes the shared DiT for good)."""
    device = models.device
    state = state or ModelState()
    state.calibration = state.calibration or list(inputs)
    for x in inputs:
        ref = state.references.setdefault(x.size, _Reference())
        if settings.fp32_reference and ref.fp32_pred is None and state.quantized is None:
            try:
                ref.fp32_pred = fp32_reference_pred(models.dit, x, settings.dtype)
            except Exception as err:  # e.g. out of memory: rows then report no rel. error, and say why
                ref.fp32_pred = None
                print(f"fp32 reference at {x.size}px failed ({short_error(err)}): no rel_err_fp32 figures")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results: list[LadderResult] = []
    reference_row = rows[0].name if rows else None
    if settings.dtype != torch.bfloat16:  # the reference row says what it really ran
        dtype_name = str(settings.dtype).removeprefix("torch.")
        rows = tuple(replace(r, name=r.name.replace("bf16", dtype_name)) for r in rows)
        reference_row = rows[0].name if rows else None
    for row in rows:
        for x in inputs:
            result = run_cell(row, models, x, state, settings, reference=row.name == reference_row)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results
