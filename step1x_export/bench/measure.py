"""Timing one callable: warm-up (compile/capture) apart from steady state, median and spread over N runs.

Clocks are read through `StageTimer`: CUDA events on a GPU (resolved after one synchronise), the host
clock on CPU. A failing callable gives a `failed` result with its error instead of stopping the run.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..timing import StageTimer

OK, FAILED, SKIPPED, NOT_IMPLEMENTED = "ok", "failed", "skipped", "not implemented"
# A row whose p10..p90 spread exceeds this share of its median is not a steady-state figure (a busy
# machine, clock changes, too few runs): it is flagged, not trusted.
SPREAD_LIMIT = 0.25
# A larger size (same stage or ladder row) timed this much faster than a smaller one contradicts the work
# done: the run was disturbed.
SIZE_SLACK = 1.2


@dataclass
class StageResult:
    """One row of a benchmark table. Times in milliseconds; None where not measured."""

    stage: str
    size: int | None
    status: str = OK
    runs: int = 0
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    min_ms: float | None = None
    first_call_ms: float | None = None  # the first call: compile, autotune, graph capture, lazy init
    peak_mem_gb: float | None = None  # torch.cuda.max_memory_allocated; None (shown 'n/a') on CPU
    note: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(median: float | None, p10: float | None, p90: float | None) -> float | None:
    """(p90 - p10) / median: the relative width of a row's middle 80 %; None where not measured."""
    if median is None or p10 is None or p90 is None or median <= 0:
        return None
    return (p90 - p10) / median


def too_wide(median: float | None, p10: float | None, p90: float | None, limit: float = SPREAD_LIMIT) -> bool:
    width = spread(median, p10, p90)
    return width is not None and width > limit


def summarize(result: StageResult, seconds: list[float]) -> StageResult:
    """Fill median / p10 / p90 / min (ms) from per-run seconds."""
    ms = [s * 1000 for s in seconds]
    result.runs = len(ms)
    result.median_ms = statistics.median(ms)
    result.p10_ms, result.p90_ms, result.min_ms = percentile(ms, 10), percentile(ms, 90), min(ms)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def short_error(err: BaseException) -> str:
    """`Type: message` plus the innermost frame, on one line: enough to act on, short enough for a table."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {message[:300]}{where}"


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, read after the device has finished (StageTimer: CUDA events / host clock)."""
    timer = StageTimer(device)
    with timer.stage("call"):
        fn()
    return timer.resolve()["call"]


def measure(
    stage: str,
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    size: int | None = None,
    warmup: int = 1,
    runs: int = 5,
    note: str = "",
) -> StageResult:
    """Time `fn`: the first call apart (compile/capture), `warmup - 1` more untimed calls, then `runs` timed ones."""
    if runs < 1 or warmup < 1:
        raise ValueError(f"{stage}: runs and warmup must be >= 1, got runs={runs}, warmup={warmup}")
    device = torch.device(device)
    result = StageResult(stage=stage, size=size, note=note)
    try:
        synchronize(device)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        result.first_call_ms = (time.perf_counter() - t0) * 1000
        for _ in range(warmup - 1):
            fn()
        summarize(result, [time_call(fn, device) for _ in range(runs)])
        result.peak_mem_gb = peak_memory_gb(device)
    except Exception as err:  # a failed stage is a row of the table, not the end of the run
        result.status, result.error = FAILED, short_error(err)
    return result


def skipped(stage: str, size: int | None, reason: str, status: str = SKIPPED) -> StageResult:
    return StageResult(stage=stage, size=size, status=status, note=reason)
