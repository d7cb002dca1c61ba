"""The latency harness on the tiny model on CPU: tables, JSON and CSV are well formed, failures and
skipped rows are reported, files are written atomically. Timings are never asserted (only that they exist)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from step1x_export.bench.environment import environment_info
from step1x_export.bench.ladder import DEFAULT_ROW, LADDER, LadderSettings, psnr, rel_err, row_options, run_ladder
from step1x_export.bench.measure import FAILED, OK, SKIPPED, measure, percentile
from step1x_export.bench.models import activation_check, build_models, dit_inputs
from step1x_export.bench.report import (
    BenchReport,
    ladder_table,
    stages_table,
    write_all,
    write_csv,
    write_json,
    write_text_atomic,
)
from step1x_export.bench.stages import StageSettings, run_stages
from step1x_export.runtime.options import RuntimeOptions

SIZES = (32, 48)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: the tiny model's ops are too small to share, and on a loaded 2-core machine
    OpenMP spin-waiting makes them several times slower. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models():
    return build_models("tiny", "cpu", dtype=torch.float32, with_mllm=True, seed=0)


@pytest.fixture(scope="module")
def stage_results(models):
    settings = StageSettings(sizes=SIZES, steps=2, runs=2, warmup=1)
    return run_stages(models, settings)


@pytest.fixture(scope="module")
def ladder_results(models):
    inputs = [dit_inputs(models.config, s, 2, models.device) for s in SIZES]
    settings = LadderSettings(base=RuntimeOptions(precision="bf16"), steps=2, full_steps=28)
    bf16 = build_models("tiny", "cpu", dtype=torch.bfloat16, with_mllm=False, with_vae=True)
    return run_ladder(bf16, inputs, settings)


def _report(stages, ladder) -> BenchReport:
    return BenchReport(env=environment_info("cpu"), conditions={"model": "tiny", "runs": 2}, stages=stages,
                       ladder=ladder, activations=[])


def test_every_stage_at_every_size_has_positive_medians(stage_results):
    by_key = {(r.stage, r.size): r for r in stage_results}
    expected = {("mllm", None)} | {(s, z) for s in ("connector", "dit_step", "vae_encode", "vae_decode", "edit")
                                   for z in SIZES}
    assert set(by_key) == expected
    for r in stage_results:
        assert r.status == OK, (r.stage, r.size, r.error)
        assert r.runs == 2
        assert r.median_ms > 0 and r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.first_call_ms > 0
        assert r.peak_mem_gb is None  # CPU: 'n/a'
    step = by_key[("dit_step", SIZES[0])]
    assert step.extra["batch"] == 2
    assert step.extra["denoise_est_ms"] == pytest.approx(2 * step.median_ms)


def test_failed_stage_is_reported_and_the_run_goes_on(models):
    def broken() -> None:
        raise RuntimeError("injected failure in the VAE decoder")

    settings = StageSettings(sizes=(32,), steps=1, runs=1, warmup=1, stages=("connector", "vae_decode", "dit_step"))
    results = run_stages(models, settings, hooks={"vae_decode": broken})
    status = {r.stage: r for r in results}
    assert status["vae_decode"].status == FAILED
    assert "RuntimeError: injected failure in the VAE decoder" in status["vae_decode"].error
    assert status["dit_step"].status == OK and status["dit_step"].median_ms > 0  # measured after the failure
    table = stages_table(_report(results, []))
    assert "failed: RuntimeError: injected failure" in table


def test_measure_catches_errors_and_validates_arguments():
    def boom() -> None:
        raise ValueError("bad shape 3 != 4")

    result = measure("x", boom, device="cpu", size=16, runs=2)
    assert result.status == FAILED and "bad shape 3 != 4" in result.error and result.median_ms is None
    with pytest.raises(ValueError, match="runs and warmup"):
        measure("x", lambda: None, device="cpu", runs=0)


def test_percentile_interpolates():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 10) == pytest.approx(1.4)
    assert percentile(values, 90) == pytest.approx(4.6)


def test_ladder_on_cpu_runs_the_reference_and_skips_the_rest_explicitly(ladder_results):
    assert [(r.row, r.size) for r in ladder_results] == [(row.name, s) for row in LADDER for s in SIZES]
    by_row = {}
    for r in ladder_results:
        by_row.setdefault(r.row, []).append(r)
    for r in by_row["eager bf16"]:
        assert r.status == OK, r.error
        assert r.steps_timed == 2 and r.median_ms > 0
        assert r.speedup == pytest.approx(1.0)
        # bf16 vs an fp32 run of the same weights: a real, small, non-zero error
        assert 1e-4 < r.rel_err_fp32 < 0.05
        assert r.lossless is True
    for name in ("+ compile", "+ CUDA graphs", "+ FP8 GEMMs"):
        for r in by_row[name]:
            assert r.status == SKIPPED and r.note.startswith("skipped:"), (name, r.note)
            assert r.median_ms is None
    assert all("needs CUDA" in r.note for r in by_row["+ CUDA graphs"] + by_row["+ FP8 GEMMs"])
    assert all(r.status == "not implemented" for r in by_row["+ FP8 attention"])
    table = ladder_table(_report([], ladder_results))
    assert "skipped: needs CUDA" in table and "not implemented" in table


def test_ladder_deadline_skips_remaining_rows(models):
    inputs = [dit_inputs(models.config, 32, 1, models.device)]
    settings = LadderSettings(base=RuntimeOptions(precision="fp32"), steps=1, deadline=0.0, fp32_reference=False)
    results = run_ladder(models, inputs, settings, rows=LADDER[:1])
    assert results[0].row == "eager float32"  # the reference row names the dtype it really ran
    assert results[0].status == SKIPPED and "time budget" in results[0].note


def test_fidelity_metrics():
    ref = torch.linspace(-1, 1, 1000)
    noisy = ref + 0.01 * torch.sin(torch.arange(1000.0))
    assert rel_err(ref, ref) == 0.0 and math.isinf(psnr(ref, ref))
    mse = float((noisy - ref).pow(2).mean())
    assert psnr(noisy, ref) == pytest.approx(10 * math.log10(4 / mse), rel=1e-5)
    assert rel_err(noisy, ref) == pytest.approx(float((noisy - ref).norm() / ref.norm()), rel=1e-6)


def test_activation_check_flags_dead_and_live_models(models):
    x = dit_inputs(models.config, 32, 2, models.device)
    live = activation_check(models.dit, x, torch.float32)
    assert live["finite"] and live["ok"] and 0.01 < live["pred_rms"] < 100
    dead = build_models("tiny", "cpu", dtype=torch.float32, with_mllm=False, with_vae=False).dit
    with torch.no_grad():
        for p in dead.parameters():
            p.zero_()
    assert activation_check(dead, x, torch.float32)["ok"] is False


def test_json_csv_png_outputs_are_well_formed(tmp_path: Path, stage_results, ladder_results):
    report = _report(stage_results, ladder_results)
    messages = write_all(report, tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["schema"].startswith("step1x-export.bench/")
    for key in ("device", "driver", "torch", "transformers", "onnxruntime"):
        assert data["env"][key], key
    assert {r["stage"] for r in data["stages"]} >= {"mllm", "dit_step", "vae_decode", "edit"}
    assert all(r["median_ms"] > 0 for r in data["stages"])
    assert len(data["ladder"]) == len(LADDER) * len(SIZES)
    with (tmp_path / "bench_stages.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(stage_results)
    assert all(r["device"] == report.env["device"] and r["torch"] == torch.__version__ for r in rows)
    assert "model=tiny" in rows[0]["conditions"]
    with (tmp_path / "bench_ladder.csv").open() as f:
        assert {r["status"] for r in csv.DictReader(f)} >= {"ok", "skipped", "not implemented"}
    png = tmp_path / "bench_ladder.png"
    if any("matplotlib is not installed" in m for m in messages):
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = stages_table(report)
    assert table.splitlines()[0].startswith("device: CPU") and "conditions: model=tiny" in table


def test_writes_are_atomic(tmp_path: Path, stage_results):
    target = tmp_path / "bench.json"
    write_text_atomic(target, "previous\n")

    def fail(tmp: Path) -> None:
        tmp.write_text("half a fi")
        raise OSError("disk full")

    from step1x_export.bench.report import write_atomic

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "previous\n"  # the old file survives an interrupted write
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary left behind
    report = _report(stage_results, [])
    write_json(report, target)
    write_csv(report.stages, tmp_path / "s.csv", report)
    assert json.loads(target.read_text())["stages"] and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json",
                                                                                                        "s.csv"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_text_atomic(tmp_path / "missing" / "x.json", "{}")


def test_inf_psnr_is_valid_json(tmp_path: Path, ladder_results):
    report = _report([], ladder_results)
    report.ladder[0].psnr_db = math.inf
    write_json(report, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["ladder"][0]["psnr_db"] == "inf"


def test_bench_cli_tiny(tmp_path: Path):
    from click.testing import CliRunner

    from step1x_export.cli.bench import bench

    runner = CliRunner()
    result = runner.invoke(bench, ["--sizes", "32", "--steps", "2", "--runs", "1", "--warmup", "1", "--ladder-steps",
                                   "1", "--precision", "fp32", "--no-mllm", "--stages", "dit_step,vae_decode",
                                   "--out-dir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "dit_step" in result.output and "skipped: needs CUDA" in result.output
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench_ladder.csv").is_file()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["conditions"]["threads"] == 1 and data["ladder"][0]["options"]["threads"] == 1  # a small model's
    bad = runner.invoke(bench, ["--sizes", "30", "--out-dir", str(tmp_path)])
    assert bad.exit_code != 0 and "multiples of 16" in bad.output
    assert "--ladder / --no-ladder" in runner.invoke(bench, ["--help"]).output


def test_bench_threads_is_the_runtimes_flag(tmp_path: Path):
    """`bench --threads N`: the run (stage timings, activation checks) under N threads and every ladder row's
    runtime built with N, as `edit --threads N` runs; nothing timed here (two threads on a busy machine spin)."""
    from click.testing import CliRunner

    from step1x_export.bench.run import BenchConfig
    from step1x_export.cli.bench import bench

    result = CliRunner().invoke(bench, ["--sizes", "32", "--steps", "1", "--no-mllm", "--stages", "mllm",
                                        "--no-ladder", "--cache", "", "--out-dir", str(tmp_path), "--device", "cpu",
                                        "--threads", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["conditions"]["threads"] == 2 and "(torch threads 2)" in data["env"]["device"]
    assert data["config"]["runtime"]["threads"] == 2
    assert BenchConfig(runtime=RuntimeOptions(threads=2)).base_options().threads == 2  # the ladder's rows start here


def test_fp8_row_quantizes_with_the_calibrate_recipe(models):
    """The FP8 row's transform (emulated GEMMs on CPU): calibrated on the bench inputs, close to bf16."""
    from step1x_export.bench.ladder import quantize
    from step1x_export.calibrate.qlinear import QuantLinear

    bf16 = build_models("tiny", "cpu", dtype=torch.bfloat16, with_mllm=False, with_vae=False)
    dit = bf16.dit
    x = dit_inputs(models.config, 32, 2, models.device)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return dit(x.img.bfloat16(), x.pe, x.t.bfloat16(), x.llm_embedding.bfloat16(), x.llm_mask).float()

    ref = run()
    note = quantize(bf16, "fp8", [x])[1]
    assert "calibrate 'fp8' recipe" in note
    assert isinstance(dit.single_blocks[0].linear1, QuantLinear)
    assert isinstance(dit.double_blocks[0].img_mod.lin, torch.nn.Linear)  # modulation stays high precision
    assert 1e-4 < rel_err(run(), ref) < 0.05


def test_ladder_rows_are_runtime_options():
    """Every row is RuntimeOptions (no toggles of its own); the default row is the shipped default."""
    settings = LadderSettings(base=RuntimeOptions(precision="bf16"))
    assert row_options(next(r for r in LADDER if r.name == DEFAULT_ROW), settings) == RuntimeOptions()
    eager, compiled = (row_options(r, settings) for r in LADDER[:2])
    assert (eager.compile, eager.cuda_graphs, compiled.compile, compiled.cuda_graphs) == (False, False, True, False)
    with pytest.raises(NotImplementedError, match="attention_fp8"):
        row_options(LADDER[-1], settings)


@pytest.mark.usefixtures("fresh_compiles")
def test_compile_row_runs_through_the_runtime_on_cpu(models):
    """The '+ compile' row forced on CPU: compiled by the runtime (one compile per block type), the same
    final latent as the eager row within fp32 rounding, and the DiT handed back eager afterwards."""
    from step1x_export.runtime.engines.compile import is_compiled

    inputs = [dit_inputs(models.config, 32, 1, models.device)]
    settings = LadderSettings(base=RuntimeOptions(precision="fp32"), steps=1, compile_on_cpu=True,
                              fp32_reference=False)
    eager, compiled = run_ladder(models, inputs, settings, rows=LADDER[:2])
    assert eager.status == OK and compiled.status == OK, (eager.error, compiled.error)
    assert compiled.options["compile"] is True and compiled.compiles == 2
    assert compiled.psnr_db > 100, compiled.psnr_db  # fp32 rounding only (inductor reorders reductions)
    assert not is_compiled(models.dit)
