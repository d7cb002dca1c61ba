"""Latency benchmarks: per-stage timings of an edit and the ablation ladder of runtime toggles.

    from step1x_export.bench import BenchConfig, run_benchmark, write_all, stages_table, ladder_table
    report = run_benchmark(BenchConfig(model="tiny", device="cpu", sizes=(64, 96)))
    write_all(report, Path("bench_out")); print(stages_table(report)); print(ladder_table(report))

The GPU run of the full-size model is `benchmarks/device_ladder.sh` (docs/benchmarks.md).
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "BenchConfig": ".run",
    "BenchModels": ".models",
    "BenchReport": ".report",
    "DiTInputs": ".models",
    "DEFAULT_ROW": ".ladder",
    "LADDER": ".ladder",
    "LadderResult": ".ladder",
    "LadderRow": ".ladder",
    "LadderSettings": ".ladder",
    "ModelState": ".ladder",
    "STAGES": ".stages",
    "StageResult": ".measure",
    "StageSettings": ".stages",
    "activation_check": ".models",
    "build_models": ".models",
    "bench_runtime": ".runtimes",
    "dit_inputs": ".models",
    "ladder_table": ".report",
    "measure": ".measure",
    "plot_ladder": ".report",
    "run_benchmark": ".run",
    "run_ladder": ".ladder",
    "run_stages": ".stages",
    "stages_table": ".report",
    "whole_edit_fn": ".stages",
    "row_options": ".ladder",
    "write_all": ".report",
    "write_csv": ".report",
    "write_json": ".report",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
