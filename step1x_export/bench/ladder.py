"""The ablation ladder: reference eager bf16, then one runtime toggle more per row, each row with its own
latency and fidelity figures on the same inputs.

Fidelity per row and size:
  rel_err_fp32  ||pred - pred_fp32|| / ||pred_fp32|| of one DiT step (noisy half only: the reference half
                is discarded), against an fp32 run of the same weights;
  psnr_db       PSNR of the final latent after the ladder's K steps vs the eager bf16 row's latent,
                peak = the reference latent's range.

The ladder mutates the model as it climbs (compiles blocks, swaps Linear layers for FP8 ones and drops the
bf16 weights), so rows run in order, each at every size before the next row, and FP8 rows come last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..runtime.cudagraph import CudaGraphed
from ..step1x_ref.model import Step1XEdit
from ..step1x_ref.sampling import StepFn, denoise, guided_euler
from ..timing import StageTimer
from .measure import FAILED, NOT_IMPLEMENTED, OK, SKIPPED, peak_memory_gb, reset_peak_memory, short_error, synchronize
from .measure import percentile as _percentile

if TYPE_CHECKING:  # models imports the MLLM (transformers); the ladder only needs the type
    from .models import DiTInputs


@dataclass(frozen=True)
class Toggles:
    """The runtime's optimisation flags (mirrors `runtime.RuntimeOptions`: compile, cuda_graphs, precision,
    attention_fp8); `fp8_gemm` stands for precision=fp8."""

    compile: bool = False
    cuda_graphs: bool = False
    fp8_gemm: bool = False
    fp8_attention: bool = False


@dataclass(frozen=True)
class LadderRow:
    name: str
    toggles: Toggles
    description: str


LADDER: tuple[LadderRow, ...] = (
    LadderRow("eager bf16", Toggles(), "reference: eager PyTorch, bf16"),
    LadderRow("+ compile", Toggles(compile=True),
              "torch.compile of each DiT block (fuses norm+modulation, RoPE, GELU, residual gates)"),
    LadderRow("+ CUDA graphs", Toggles(compile=True, cuda_graphs=True), "the whole step captured once per shape"),
    LadderRow("+ FP8 GEMMs", Toggles(compile=True, cuda_graphs=True, fp8_gemm=True), "E4M3 W8A8 block GEMMs"),
    LadderRow("+ FP8 attention", Toggles(compile=True, cuda_graphs=True, fp8_gemm=True, fp8_attention=True),
              "E4M3 attention"),
)


@dataclass
class LadderSettings:
    dtype: torch.dtype = torch.bfloat16
    steps: int = 4  # K timed denoising steps per row (the figures' sample count)
    full_steps: int = 28  # per-edit estimate = full_steps x median step (extrapolated, not measured)
    guidance: float = 6.0
    truncate: float = 0.93
    compile_mode: str = "max-autotune-no-cudagraphs"
    compile_on_cpu: bool = False  # inductor on CPU builds C++ for minutes: off unless asked
    fp32_reference: bool = True
    deadline: float | None = None  # time.monotonic() after which remaining cells are skipped
    min_cell_s: float = 0.0  # a cell starts only if this much time is left before the deadline


@dataclass
class LadderResult:
    row: str
    size: int
    status: str = OK
    description: str = ""
    steps_timed: int = 0
    median_ms: float | None = None  # per DiT step (batch 2, CFG)
    p10_ms: float | None = None
    p90_ms: float | None = None
    first_call_ms: float | None = None  # compile / autotune / capture
    est_edit_s: float | None = None  # full_steps x median (extrapolated)
    speedup: float | None = None  # eager bf16 median / this median, same size, same run
    rel_err_fp32: float | None = None
    psnr_db: float | None = None
    lossless: bool | None = None  # rel_err_fp32 <= 1.1 x eager bf16's (non-quantized rows)
    peak_mem_gb: float | None = None
    note: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Reference:
    fp32_pred: Tensor | None = None
    bf16_latent: Tensor | None = None
    eager_rel_err: float | None = None
    eager_ms: float | None = None


@dataclass
class ModelState:
    compiled: bool = False
    fp8: bool = False
    fp8_note: str = ""
    calibration: list[DiTInputs] = field(default_factory=list)  # what the FP8 row calibrates on
    references: dict[int, _Reference] = field(default_factory=dict)


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
    model.float()
    try:
        pred = model(inputs.img.float(), inputs.pe, inputs.t.float(), inputs.llm_embedding.float(), inputs.llm_mask)
        return pred.float()
    finally:
        model.to(dtype)


# -- toggles ------------------------------------------------------------------------------------------------
def _blocks(model: Step1XEdit) -> list[nn.Module]:
    return [*model.double_blocks, *model.single_blocks]


def set_compiled(model: Step1XEdit, on: bool, mode: str) -> None:
    """torch.compile each block in place (per block: one compile per block type, not per model)."""
    import torch._dynamo

    # Blocks of a type share one code object: entries = block types x sizes x (bf16, FP8) must all fit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in _blocks(model):
        if on:
            # fullgraph=False: a graph break (e.g. inside a quantized Linear) costs speed, not the row;
            # run_cell reports how many there were.
            block.compile(mode=mode, fullgraph=False, dynamic=False)
        else:
            block._compiled_call_impl = None  # what nn.Module.compile sets; None restores eager


def quantize_fp8(model: Step1XEdit, calibration: list[DiTInputs], dtype: torch.dtype) -> str:
    """FP8 W8A8 GEMMs, in place, with `step1x_export.calibrate`'s recipe: static activation scales calibrated
    on one eager step of each ladder input, per-channel weight scales, its layer selection. Returns what ran,
    for the row's note."""
    from ..calibrate.apply import quantize_model
    from ..calibrate.collect import StatsCollector
    from ..calibrate.recipes import build_artifact

    collector = StatsCollector(model)
    with collector.active(), torch.inference_mode():
        for x in calibration:  # the measured inputs themselves: optimistic for fidelity, exact for speed
            model(x.img.to(dtype), x.pe, x.t.to(dtype), x.llm_embedding.to(dtype), x.llm_mask)
    artifact = build_artifact(model, collector.stats, "fp8", model_hash="bench-random-weights",
                              calibration={"source": "bench ladder inputs, one step each"})
    quantize_model(model, artifact, check_hash=False)
    return (f"calibrate 'fp8' recipe: {len(artifact.layers)} Linear layers, static activation scales from "
            f"{len(calibration)} bench input(s)")


def fp8_attention_status() -> str | None:
    """None when the runtime can run FP8 attention; else why not (the row then says 'not implemented')."""
    from ..runtime.options import RuntimeOptions

    try:
        RuntimeOptions(attention_fp8=True)
    except NotImplementedError as err:
        return str(err)
    return "the runtime accepts attention_fp8 but the ladder has no hook for it yet"


def unsupported(toggles: Toggles, device: torch.device, settings: LadderSettings) -> tuple[str, str] | None:
    """(status, reason) when a row cannot run here, checked before any work."""
    cuda = device.type == "cuda"
    if toggles.fp8_attention and (reason := fp8_attention_status()):
        return NOT_IMPLEMENTED, f"not implemented: {reason}"
    if (toggles.cuda_graphs or toggles.fp8_gemm) and not cuda:
        return SKIPPED, "skipped: needs CUDA"
    if toggles.fp8_gemm and torch.cuda.get_device_capability(device) < (8, 9):
        cap = torch.cuda.get_device_capability(device)
        return SKIPPED, f"skipped: FP8 GEMMs need compute capability >= 8.9, got {cap[0]}.{cap[1]}"
    if toggles.compile and not cuda and not settings.compile_on_cpu:
        return SKIPPED, "skipped: torch.compile on CPU is off (slow C++ builds; enable with --compile-cpu)"
    return None


def _graphed(step: StepFn) -> StepFn:
    """The DiT call as one CUDA graph per input shape: the runtime's wrapper (static inputs, warm-up, capture)."""
    return CudaGraphed(step, enabled=True)


def build_step(model: Step1XEdit, inputs: DiTInputs, toggles: Toggles, state: ModelState,
               settings: LadderSettings) -> StepFn:
    """Bring the model to `toggles` (compile / FP8 are applied in place) and return its step function."""
    if state.fp8 and not toggles.fp8_gemm:
        raise ValueError("the model was already quantized to FP8: order the ladder's FP8 rows last")
    if toggles.fp8_gemm and not state.fp8:
        if state.compiled:  # calibration hooks run eagerly; the blocks are recompiled below
            set_compiled(model, False, settings.compile_mode)
            state.compiled = False
        state.fp8_note = quantize_fp8(model, state.calibration or [inputs], settings.dtype)
        state.fp8 = True
    if toggles.compile != state.compiled:
        set_compiled(model, toggles.compile, settings.compile_mode)
        state.compiled = toggles.compile
    step = dit_step_fn(model, inputs, settings.dtype)
    return _graphed(step) if toggles.cuda_graphs else step


def dit_step_fn(model: Step1XEdit, inputs: DiTInputs, dtype: torch.dtype) -> StepFn:
    """The eager DiT call on `inputs`' conditioning, in `dtype`, returning float32 (what `guided_euler` takes)."""
    emb, mask, pe = inputs.llm_embedding.to(dtype), inputs.llm_mask, inputs.pe

    @torch.inference_mode()
    def step(img: Tensor, t: Tensor) -> Tensor:
        return model(img.to(dtype), pe, t.to(dtype), emb, mask).float()

    return step


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def timed_calls(fn: Callable[..., Tensor], device: torch.device, timers: list[StageTimer]) -> Callable[..., Tensor]:
    """`fn`, timing each call under the stage "step" of a new `StageTimer` appended to `timers` (CUDA events:
    no sync per call; `timer.resolve()` afterwards)."""

    def run(*args: Tensor) -> Tensor:
        timer = StageTimer(device)
        with timer.stage("step"):
            out = fn(*args)
        timers.append(timer)
        return out

    return run


# -- running ---------------------------------------------------------------------------------------------
def _fill_timing(result: LadderResult, seconds: list[float], settings: LadderSettings) -> None:
    ms = sorted(s * 1000 for s in seconds)
    result.steps_timed = len(ms)
    result.median_ms = _percentile(ms, 50)
    result.p10_ms, result.p90_ms = _percentile(ms, 10), _percentile(ms, 90)
    result.est_edit_s = settings.full_steps * result.median_ms / 1000


def run_cell(row: LadderRow, model: Step1XEdit, inputs: DiTInputs, state: ModelState,
             settings: LadderSettings, device: torch.device) -> LadderResult:
    """One row at one size. Any failure becomes the row's status and error; the ladder goes on."""
    result = LadderResult(row=row.name, size=inputs.size, description=row.description)
    ref = state.references.setdefault(inputs.size, _Reference())
    if (why := unsupported(row.toggles, device, settings)) is not None:
        result.status, result.note = why
        return result
    if settings.deadline is not None and time.monotonic() + settings.min_cell_s > settings.deadline:
        result.status, result.note = SKIPPED, "skipped: time budget of the run spent"
        return result
    try:
        step = build_step(model, inputs, row.toggles, state, settings)
        result.note = state.fp8_note if row.toggles.fp8_gemm else ""
        synchronize(device)
        reset_peak_memory(device)
        breaks = _graph_breaks()
        t0 = time.perf_counter()
        step(inputs.img, inputs.t)
        synchronize(device)
        result.first_call_ms = (time.perf_counter() - t0) * 1000
        if row.toggles.compile and (n_breaks := _graph_breaks() - breaks):
            result.note = f"{result.note}; {n_breaks} graph break(s) while compiling".lstrip("; ")
        n = inputs.noise.shape[1]
        pred = step(inputs.img, inputs.t)  # steady state: what the fidelity figure judges
        if ref.fp32_pred is not None:
            result.rel_err_fp32 = rel_err(pred[:, :n], ref.fp32_pred[:, :n])
        timers: list[StageTimer] = []
        latent = denoise(guided_euler(timed_calls(step, device, timers)), inputs.noise, inputs.ref, inputs.timesteps,
                         guidance=settings.guidance, truncate=settings.truncate)
        _fill_timing(result, [t.resolve()["step"] for t in timers], settings)
        result.peak_mem_gb = peak_memory_gb(device)
        if row.toggles == Toggles():
            ref.bf16_latent, ref.eager_rel_err, ref.eager_ms = latent, result.rel_err_fp32, result.median_ms
        elif ref.bf16_latent is not None:
            result.psnr_db = psnr(latent, ref.bf16_latent)
        if ref.eager_ms and result.median_ms:
            result.speedup = ref.eager_ms / result.median_ms
        quantized = row.toggles.fp8_gemm or row.toggles.fp8_attention
        if not quantized and ref.eager_rel_err is not None and result.rel_err_fp32 is not None:
            result.lossless = result.rel_err_fp32 <= max(1.1 * ref.eager_rel_err, 1e-5)  # floor: fp32 rows
        del step
    except Exception as err:  # one failed row is a row of the table, not the end of the run
        result.status, result.error = FAILED, short_error(err)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # graph pools and autotune buffers of this cell
    return result


def run_ladder(
    model: Step1XEdit,
    inputs: list[DiTInputs],
    settings: LadderSettings,
    *,
    rows: tuple[LadderRow, ...] = LADDER,
    on_result: Callable[[LadderResult], None] | None = None,
    state: ModelState | None = None,
) -> list[LadderResult]:
    """Every row at every size, rows outer (the model is mutated as the ladder climbs)."""
    device = inputs[0].noise.device
    state = state or ModelState()
    state.calibration = state.calibration or list(inputs)
    for x in inputs:
        ref = state.references.setdefault(x.size, _Reference())
        if settings.fp32_reference and ref.fp32_pred is None:
            try:
                ref.fp32_pred = fp32_reference_pred(model, x, settings.dtype)
            except Exception as err:  # e.g. out of memory: rows then report no rel. error, and say why
                ref.fp32_pred = None
                print(f"fp32 reference at {x.size}px failed ({short_error(err)}): no rel_err_fp32 figures")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results: list[LadderResult] = []
    if settings.dtype != torch.bfloat16:  # the reference row says what it really ran
        dtype_name = str(settings.dtype).removeprefix("torch.")
        rows = tuple(replace(r, name=r.name.replace("bf16", dtype_name)) if r.toggles == Toggles() else r for r in rows)
    for row in rows:
        for x in inputs:
            result = run_cell(row, model, x, state, settings, device)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results
