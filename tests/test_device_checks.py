"""CPU dry run of the device-check script (benchmarks/device_checks.py) on the tiny model.

Asserts the JSON is well formed, every entry has a status, GPU-only parts say they need CUDA, and the
numbers the CPU can produce are finite and plausible: the compiled runtime against an eager one (compile
is forced on CPU, so the two really differ in how they run), export parity, quantization errors; never
timings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("device_checks")  # one run of the device-check script serves every test here

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--device", "cpu", "--sizes", "32", "--aspects", "3", "--graph-cache", "2", "--steps", "1",
         "--edit-size", "32", "--edit-steps", "1", "--quant-size", "32", "--export-size", "32", "--runs", "1"]


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def entries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("device_checks")
    env = dict(os.environ, OUT=str(out), DEVICE_TIMEOUT_S="570")  # inductor's C++ builds on a loaded 2-core box
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "device_checks", *FLAGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "device_checks.log").is_file()
    data = json.loads((out / "device_checks.json").read_text())
    assert data["env"]["device"].startswith("CPU")
    assert proc.stdout.rstrip().splitlines()[-1].startswith("export.ort_parity")  # the table is printed last
    return {e["name"]: e for e in data["entries"]}


def test_every_entry_has_a_status_and_finite_numbers(entries: dict[str, dict]) -> None:
    expected = {"runtime.build", "runtime.one_compiled_runtime", "runtime.edit_peak@32", "quant.step_fp32@32",
                "quant.layer_kernels", "quant.artifacts", "quant.step_fp8@32", "quant.step_int8-sq@32",
                "export.dit_2+2", "export.ort_parity"}
    assert expected <= set(entries), sorted(expected - set(entries))
    for name, e in entries.items():
        assert e["status"] and not e["status"].startswith("failed"), (name, e.get("error"))
        bad = [n for n in _numbers(e) if not math.isfinite(n)]
        assert not bad, (name, bad)


def test_compiled_runtime_serves_every_size_and_matches_eager(entries: dict[str, dict]) -> None:
    e = entries["runtime.one_compiled_runtime"]
    assert "needs CUDA for graphs" in e["status"]  # graphs resolve off on CPU, and the entry says so
    assert e["options"] == {"compile": True, "cuda_graphs": False, "graph_cache": 2}
    assert len(e["sizes"]) == 3 and e["compiles"] == 2  # one compile per block type for every size
    # compiled (inductor C++) vs eager, fp32, same weights: rounding-level, never bit-identical by accident
    assert e["per_size"][0]["rel_diff"] <= 1e-5
    assert entries["runtime.build"]["activations"]["finite"] is True


def test_gpu_only_parts_say_so(entries: dict[str, dict]) -> None:
    rows = entries["quant.layer_kernels"]["rows"]
    assert {r["status"] for r in rows} == {"skipped: needs CUDA"}
    assert {(r["format"], r["weights"]) for r in rows} == {
        (f, w) for f in ("fp8_e4m3", "int8") for w in ("per-channel", "per-tensor")}


def test_quantization_errors_are_plausible(entries: dict[str, dict]) -> None:
    for r in entries["quant.layer_kernels"]["rows"]:
        # 8-bit W8A8 on one layer: visibly lossy, but far from noise
        assert 1e-4 < r["rel_err_emulation_vs_float"] < 0.1, r
    for name in ("quant.step_fp8@32", "quant.step_int8-sq@32"):
        assert entries[name]["finite"] is True
        assert 0 < entries[name]["rel_err_vs_bf16"] < 0.1, entries[name]


def test_export_parity(entries: dict[str, dict]) -> None:
    assert entries["export.dit_2+2"]["status"] == "ok"
    assert entries["export.ort_parity"]["max_rel_err"] < 1e-4
    assert entries["export.ort_parity"]["rel_err"] < 1e-4


def test_edit_peak_ran_the_runtime(entries: dict[str, dict]) -> None:
    e = entries["runtime.edit_peak@32"]
    assert e["output_size"] == [32, 32]
    assert e["mllm"].startswith("included")
    assert e["peak_mem_gb"] > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
