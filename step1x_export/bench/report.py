"""A benchmark run as data: JSON, CSV and text tables (device and conditions on each), and the ladder chart.

Files are written to a temporary name beside the target and renamed into place, so a reader never sees
half a file and an interrupted run leaves the previous one intact.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_path, write_text_atomic
from .environment import header_lines
from .ladder import LadderResult
from .measure import OK, SIZE_SLACK, SPREAD_LIMIT, StageResult, spread, too_wide

SCHEMA = "step1x-export.bench/1"
ENV_COLUMNS = ("device", "driver", "cuda", "torch", "transformers", "onnxruntime", "triton")


@dataclass
class BenchReport:
    env: dict[str, str]
    conditions: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # everything the run was asked to do
    stages: list[StageResult] = field(default_factory=list)
    ladder: list[LadderResult] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)  # models.activation_check per size
    notes: list[str] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)  # caching.CacheRow per step-cache setting

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "env": self.env,
            "conditions": self.conditions,
            "config": self.config,
            "activations": self.activations,
            "stages": [r.to_dict() for r in self.stages],
            "ladder": [r.to_dict() for r in self.ladder],
            "cache": self.cache,
            "notes": self.notes,
            "warnings": timing_warnings(self),
        }


# -- atomic files ---------------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def _json_safe(value: Any) -> Any:
    """inf/NaN are not JSON: write them as strings ('inf'), everything else as is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: BenchReport, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(_json_safe(report.to_dict()), indent=2) + "\n")


def _csv_text(rows: list[dict[str, Any]], env: dict[str, str], conditions: dict[str, Any]) -> str:
    """One row per result, with the device/versions and the conditions repeated on every row."""
    cond = "; ".join(f"{k}={v}" for k, v in conditions.items())
    full = [{**r, **{k: env.get(k, "") for k in ENV_COLUMNS}, "conditions": cond} for r in rows]
    buf = io.StringIO()
    if full:
        writer = csv.DictWriter(buf, fieldnames=list(full[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(full)
    return buf.getvalue()


def write_csv(rows: list[StageResult] | list[LadderResult], path: Path, report: BenchReport) -> Path:
    dicts = []
    for r in rows:
        d = r.to_dict()
        if "extra" in d:
            d["extra"] = json.dumps(_json_safe(d["extra"]))
        dicts.append(d)
    return write_text_atomic(path, _csv_text(dicts, report.env, report.conditions))


# -- text tables ------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _render(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return out


def _status(r: StageResult | LadderResult) -> str:
    if r.status == "ok":
        return "ok"
    return f"{r.status}: {r.error}" if r.error else (r.note or r.status)


def _spread(r: StageResult | LadderResult) -> str:
    """"12%", with " NOISY" when p10..p90 is wider than SPREAD_LIMIT of the median."""
    width = spread(r.median_ms, r.p10_ms, r.p90_ms)
    if width is None:
        return "n/a"
    return f"{100 * width:.0f}%" + (" NOISY" if too_wide(r.median_ms, r.p10_ms, r.p90_ms) else "")


def _row_key(r: StageResult | LadderResult) -> str:
    return r.stage if isinstance(r, StageResult) else r.row


def timing_warnings(report: BenchReport) -> list[str]:
    """Rows too noisy to trust, and sizes whose timings contradict the work (a larger size faster)."""
    rows = [r for r in (*report.stages, *report.ladder) if r.status == OK and r.median_ms is not None]
    out = [f"{_row_key(r)} at {r.size}: p10..p90 spread {_spread(r)} of the median (limit "
           f"{100 * SPREAD_LIMIT:.0f}%): not a steady-state figure; rerun on an idle machine or with more --runs"
           for r in rows if too_wide(r.median_ms, r.p10_ms, r.p90_ms)]
    by_key: dict[str, list[StageResult | LadderResult]] = {}
    for r in rows:
        if r.size is not None:
            by_key.setdefault(_row_key(r), []).append(r)
    for key, group in by_key.items():
        group.sort(key=lambda r: r.size)
        for small, large in zip(group, group[1:], strict=False):
            if small.median_ms > SIZE_SLACK * large.median_ms:
                out.append(f"{key}: {small.size} timed {small.median_ms / large.median_ms:.1f}x slower than "
                           f"{large.size}, which does more work: the machine was busy; these timings are suspect")
    return out


def stages_table(report: BenchReport) -> str:
    columns = ["stage", "size", "median ms", "p10 ms", "p90 ms", "spread", "first call ms", "peak GB", "runs",
               "status"]
    rows = []
    for r in report.stages:
        rows.append([r.stage, _fmt(r.size), _fmt(r.median_ms, 2), _fmt(r.p10_ms, 2), _fmt(r.p90_ms, 2), _spread(r),
                     _fmt(r.first_call_ms), _fmt(r.peak_mem_gb, 2), str(r.runs), _status(r)])
        if r.stage == "dit_step" and "denoise_est_ms" in r.extra:
            rows.append([f"  dit_step x {r.extra['steps']} (extrapolated)", _fmt(r.size),
                         _fmt(r.extra["denoise_est_ms"], 1), "", "", "", "", "", "", ""])
    return "\n".join([*header_lines(report.env, report.conditions), *_render(columns, rows), *_warning_lines(report)])


def _warning_lines(report: BenchReport) -> list[str]:
    return [f"WARNING: {w}" for w in timing_warnings(report)]


def ladder_table(report: BenchReport) -> str:
    columns = ["row", "size", "ms/step", "p10", "p90", "spread", "speedup", "first call s", "est. edit s",
               "rel err vs fp32", "PSNR dB vs bf16", "lossless", "peak GB", "status"]
    rows = [[r.row, str(r.size), _fmt(r.median_ms), _fmt(r.p10_ms), _fmt(r.p90_ms), _spread(r),
             f"{r.speedup:.2f}x" if r.speedup else "n/a",
             _fmt(None if r.first_call_ms is None else r.first_call_ms / 1000, 2),
             _fmt(r.est_edit_s, 2), "n/a" if r.rel_err_fp32 is None else f"{100 * r.rel_err_fp32:.2f}%",
             _fmt(r.psnr_db), _fmt(r.lossless), _fmt(r.peak_mem_gb, 2),
             _status(r) + (f" ({r.note})" if r.status == "ok" and r.note else "")] for r in report.ladder]
    return "\n".join([*header_lines(report.env, report.conditions), *_render(columns, rows), *_warning_lines(report)])


def activation_lines(report: BenchReport) -> list[str]:
    verdict = {True: "OK", False: "NOT finite and O(1): timings suspect"}
    return [f"activations {a.get('size')}px: finite={a['finite']}, block rms {a['block_rms_min']:.3g}.."
            f"{a['block_rms_max']:.3g}, pred rms {a['pred_rms']:.3g} -> {verdict[a['ok']]}"
            for a in report.activations]


# -- chart --------------------------------------------------------------------------------------------------
def chart_title(report: BenchReport) -> str:
    """What was measured, on what: the model, that its weights are random, the device and torch."""
    model = report.config.get("model", report.conditions.get("model", "?"))
    weights = report.conditions.get("weights", "random")
    return (f"Step1X-Edit ablation ladder: model '{model}' ({weights} weights)\n"
            f"{report.env['device']}, torch {report.env['torch']}")


def plot_ladder(report: BenchReport, path: Path) -> str:
    """A PNG bar chart of ms/step per ladder row and size; returns a message (the chart is skipped without
    matplotlib, a dev dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    if not report.ladder:
        return "chart skipped: no ladder rows"
    rows = list(dict.fromkeys(r.row for r in report.ladder))
    sizes = sorted({r.size for r in report.ladder})
    by_key = {(r.row, r.size): r for r in report.ladder}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    width = 0.8 / len(sizes)
    for j, size in enumerate(sizes):
        xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(rows))]
        cells = [by_key.get((row, size)) for row in rows]
        values = [(r and r.median_ms) or 0.0 for r in cells]
        # p10..p90 as the error bar: a reader sees at once which bars are steady and which are noise
        below = [max(0.0, v - r.p10_ms) if r and r.p10_ms is not None and v else 0.0 for r, v in zip(cells, values,
                                                                                                       strict=True)]
        above = [max(0.0, r.p90_ms - v) if r and r.p90_ms is not None and v else 0.0 for r, v in zip(cells, values,
                                                                                                      strict=True)]
        bars = ax.bar(xs, values, width, label=f"{size}²", yerr=[below, above], capsize=3,
                      error_kw={"elinewidth": 0.8})
        for bar, row in zip(bars, rows, strict=True):
            r = by_key.get((row, size))
            label = (f"{r.speedup:.2f}x" if r and r.speedup else "") if r and r.status == "ok" else \
                (r.status if r else "")
            if r and too_wide(r.median_ms, r.p10_ms, r.p90_ms):
                label += " (noisy)"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, rotation=90 if r and r.status != "ok" else 0)
    ax.set_xticks(range(len(rows)), rows, rotation=15, fontsize=8)
    ax.set_ylabel("ms per DiT step (batch 2, CFG); bars p10..p90")
    ax.set_title(chart_title(report), fontsize=9)
    if any(w for w in timing_warnings(report)):
        ax.text(0.01, 0.98, "WARNING: noisy or inconsistent timings (see the table)", transform=ax.transAxes,
                va="top", fontsize=7, color="red")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return f"wrote {path}"


def write_all(report: BenchReport, out_dir: Path, stem: str = "bench") -> list[str]:
    """JSON + stage CSV + ladder CSV + ladder PNG under `out_dir`; returns one message per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    messages = [f"wrote {write_json(report, out_dir / f'{stem}.json')}"]
    if report.stages:
        messages.append(f"wrote {write_csv(report.stages, out_dir / f'{stem}_stages.csv', report)}")
    if report.ladder:
        messages.append(f"wrote {write_csv(report.ladder, out_dir / f'{stem}_ladder.csv', report)}")
        messages.append(plot_ladder(report, out_dir / f"{stem}_ladder.png"))
    return messages
