"""Benchmarks that warn: the p10..p90 spread of every row, rows too noisy to trust flagged, sizes whose timings
contradict the work named, and a chart that shows the spread and says what model and weights it measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from step1x_export.bench.environment import environment_info
from step1x_export.bench.ladder import LadderResult
from step1x_export.bench.measure import SPREAD_LIMIT, StageResult, spread, too_wide
from step1x_export.bench.report import BenchReport, chart_title, ladder_table, plot_ladder, stages_table

ENV = environment_info("cpu") | {"device": "cpu (test)"}
CONDITIONS = {"model": "tiny", "weights": "random, seeded"}


def stage(size: int, median: float, p10: float, p90: float) -> StageResult:
    return StageResult("dit_step", size, runs=5, median_ms=median, p10_ms=p10, p90_ms=p90)


def test_spread_is_p10_to_p90_over_the_median():
    assert spread(100.0, 90.0, 110.0) == pytest.approx(0.2)
    assert spread(None, 1.0, 2.0) is None and spread(0.0, 0.0, 0.0) is None
    assert not too_wide(100.0, 90.0, 110.0) and too_wide(100.0, 80.0, 100.0 + 100 * SPREAD_LIMIT)


def test_noisy_and_inconsistent_rows_are_flagged():
    """The run that prompted this: under load a 64 px DiT step came out 3.7x slower than a 96 px one."""
    report = BenchReport(env=ENV, conditions=CONDITIONS, config={"model": "tiny"},
                         stages=[stage(64, 37.0, 20.0, 60.0), stage(96, 10.0, 9.5, 10.5)])
    table = stages_table(report)
    assert " spread " in table  # the column
    assert "108% NOISY" in table and "10% " in table
    assert "WARNING: dit_step at 64: p10..p90 spread 108% NOISY" in table
    assert "WARNING: dit_step: 64 timed 3.7x slower than 96" in table
    assert len(report.to_dict()["warnings"]) == 2


def test_steady_rows_carry_no_warning():
    report = BenchReport(env=ENV, conditions=CONDITIONS, stages=[stage(64, 5.0, 4.9, 5.2), stage(96, 9.0, 8.8, 9.3)])
    assert "WARNING" not in stages_table(report) and report.to_dict()["warnings"] == []


def test_ladder_rows_show_spread_and_the_chart_names_model_and_weights(tmp_path: Path):
    rows = [LadderResult("eager", 64, median_ms=10.0, p10_ms=9.0, p90_ms=11.0, speedup=1.0),
            LadderResult("eager", 96, median_ms=8.0, p10_ms=2.0, p90_ms=20.0, speedup=1.0)]
    report = BenchReport(env=ENV, conditions=CONDITIONS, config={"model": "tiny"}, ladder=rows)
    table = ladder_table(report)
    assert "20% " in table and "225% NOISY" in table and "WARNING: eager at 96" in table
    title = chart_title(report)
    assert "model 'tiny'" in title and "random, seeded weights" in title and "cpu (test)" in title
    pytest.importorskip("matplotlib")
    assert plot_ladder(report, tmp_path / "chart.png").startswith("wrote")
    assert (tmp_path / "chart.png").stat().st_size > 1000
