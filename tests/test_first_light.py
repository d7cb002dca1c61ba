"""CPU dry run of first light (`bash benchmarks/device.sh first_light`) on the tiny model, with one step made to
hang past its time limit and one to raise: every other step still runs and leaves its row, the JSON is complete,
GPU-only parts say they need CUDA, the figures the CPU can make are finite, and the markdown table is the last
thing printed. Timings are never asserted. Also the pieces that keep a short device call's evidence: the JSON
saved inside a step, a table that any step's outcome can fill, the 24gb preset's quantization letting go of the
bf16 Linears, and calibration's photographs imported only when read."""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from step1x_export.bench.checks import CheckReport
from step1x_export.bench.models import BenchModels, build_dit, dit_inputs
from step1x_export.bench.preset import quantize_24gb
from step1x_export.bench.step_pieces import PATTERNS, projected_speedup
from step1x_export.step1x_ref.configs import get_config

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--device", "cpu", "--ladder-steps", "1",
         "--inject", "env:hang", "--limit-s", "env=2", "--inject", "context:raise"]


@pytest.fixture(scope="module")
def first_light():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("first_light")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_first_light_dry_run_reports_every_step_when_one_hangs_and_one_raises(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_TIMEOUT_S="280", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "first_light", *FLAGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    constants: list[str] = []  # NaN / Infinity anywhere in the JSON
    data = json.loads((tmp_path / "first_light.json").read_text(), parse_constant=constants.append)
    assert not constants
    entries = {e["name"]: e for e in data["entries"]}
    assert list(entries) == ["env", "ladder", "context", "kernels", "preset_24gb", "caching"]
    assert entries["env"]["status"] == "timed out (2 s)"
    assert entries["context"]["status"] == "failed" and "injected" in entries["context"]["error"]
    for name in ("ladder", "kernels", "preset_24gb", "caching"):
        assert entries[name]["status"].startswith("ok"), (name, entries[name].get("error"))
    assert "needs CUDA" in entries["kernels"]["status"]
    assert entries["kernels"]["linear1@17340"]["fp8"]["status"] == "skipped: needs CUDA"  # M % 256 != 0 case
    cells = {(c["row"], c["size"]): c for c in entries["ladder"]["cells"]}
    assert cells[("eager float32", 32)]["status"] == "ok" and cells[("eager float32", 48)]["status"] == "ok"
    assert cells[("eager float32", 32)]["sdpa"]  # the kernel the row dispatched is named
    assert cells[("cudnn attention, graphs", 32)]["note"] == "skipped: needs CUDA"
    assert entries["preset_24gb"]["peak_gib"] > 0
    assert set(entries["caching"]["projected_speedup"]) == set(PATTERNS)
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("| caching |")  # the markdown table is printed last


def test_a_step_saves_its_cells_as_they_come(tmp_path: Path) -> None:
    report = CheckReport(tmp_path / "r.json", {}, {}, 0.0, 1e12)
    seen: list[dict] = []

    def step() -> dict:
        report.partial(cells=[{"row": "a"}])
        seen.append(json.loads((tmp_path / "r.json").read_text())["entries"][0])
        raise RuntimeError("later cell failed")

    report.run("ladder", step)
    assert seen == [{"name": "ladder", "status": "running", "cells": [{"row": "a"}]}]
    saved = json.loads((tmp_path / "r.json").read_text())["entries"][0]
    assert saved["status"] == "failed" and saved["cells"] == [{"row": "a"}]


def test_the_table_takes_any_step_outcome(first_light) -> None:
    entries = [{"name": n, "status": s} for n in first_light.STEPS for s in ("skipped: budget", "running")]
    entries += [{"name": "caching", "status": "failed", "error": "x", "elapsed_s": 1.0}]
    table = first_light.markdown(entries)
    assert table.count("\n") == len(entries) + 1 and table.splitlines()[-1].startswith("| caching | failed")


def test_projected_speedup_counts_the_skipped_blocks() -> None:
    pieces = {"head_ms": 1.0, "blocks_ms": 8.0, "finish_ms": 0.5, "sync_ms": 0.5, "full_ms": 9.5}
    assert projected_speedup("CCCC", pieces) == pytest.approx(9.5 / 10.0)  # the read costs when all compute
    assert projected_speedup("C..C", pieces) == pytest.approx(4 * 9.5 / (4 * 2.0 + 2 * 8.0))


def test_the_preset_quantization_lets_the_bf16_linears_go() -> None:
    config = get_config("tiny")
    cpu = torch.device("cpu")
    models = BenchModels(config=config, dit=build_dit(config, cpu, torch.float32), ae=None, mllm=None, device=cpu,
                         dtype=torch.float32, vae_dtype=torch.float32)
    linears = [weakref.ref(m) for m in models.dit.modules() if type(m) is nn.Linear]
    quantize_24gb(models, dit_inputs(config, 32, 2, cpu))
    gc.collect()
    kept = {id(m) for m in models.dit.modules()}  # the few float Linears no recipe quantizes (embedders, final)
    swapped_out_alive = [r for r in linears if r() is not None and id(r()) not in kept]
    assert len(kept & {id(r()) for r in linears if r() is not None}) < len(linears) // 4
    assert not swapped_out_alive


def test_calibration_statistics_import_without_scikit_image() -> None:
    code = ("import sys; sys.modules['skimage'] = None\n"
            "import step1x_export.calibrate.collect\n"
            "from step1x_export.calibrate.dataset import _image_array\n"
            "try:\n    _image_array('coffee')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install scikit-image" in out.stdout
