"""Latency benchmarks: per-stage timings of an edit and the ablation ladder of runtime toggles.

    from step1x_export.bench import BenchConfig, run_benchmark, write_all, stages_table, ladder_table
    report = run_benchmark(BenchConfig(model="tiny", device="cpu", sizes=(64, 96)))
    write_all(report, Path("bench_out")); print(stages_table(report)); print(ladder_table(report))

The GPU run of the full-size model is `benchmarks/device_ladder.sh` (docs/benchmarks.md).
"""

from .ladder import LADDER, LadderResult, LadderRow, LadderSettings, ModelState, Toggles, build_step, run_ladder
from .measure import StageResult, measure
from .models import BenchModels, DiTInputs, activation_check, build_models, dit_inputs
from .report import BenchReport, ladder_table, plot_ladder, stages_table, write_all, write_csv, write_json
from .run import BenchConfig, run_benchmark
from .stages import STAGES, StageSettings, run_stages, whole_edit_fn

__all__ = [
    "LADDER", "STAGES", "BenchConfig", "BenchModels", "BenchReport", "DiTInputs", "LadderResult", "LadderRow",
    "LadderSettings", "ModelState", "StageResult", "StageSettings", "Toggles", "activation_check", "build_models",
    "build_step", "dit_inputs", "ladder_table", "measure", "plot_ladder", "run_benchmark", "run_ladder",
    "run_stages", "stages_table", "whole_edit_fn", "write_all", "write_csv", "write_json",
]
