"""CPU dry run of `benchmarks/first_light.sh` on the tiny model: every step leaves a row with a status, the JSON is
complete after the run, GPU-only parts say they need CUDA, the figures the CPU can make are finite, and the
markdown table is the last thing printed. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--device", "cpu", "--ladder-steps", "1", "--cache-steps", "3"]


def test_first_light_dry_run(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_TIMEOUT_S="280")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "first_light", *FLAGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    constants: list[str] = []  # NaN / Infinity anywhere in the JSON
    data = json.loads((tmp_path / "first_light.json").read_text(), parse_constant=constants.append)
    assert not constants
    entries = {e["name"]: e for e in data["entries"]}
    assert list(entries) == ["env", "kernels", "fp8_compiles", "dit_step", "preset_24gb", "teacache"]
    for name, e in entries.items():
        assert e["status"].startswith("ok"), (name, e.get("error"))
    assert "needs CUDA" in entries["kernels"]["status"]
    assert all(r["status"] == "skipped: needs CUDA" for r in entries["kernels"]["linear1"]["rows"])
    cells = {c["row"]: c for c in entries["dit_step"]["cells"]}
    assert cells["eager bf16"]["status"] == "ok" and cells["cudnn attention, graphs"]["note"] == "skipped: needs CUDA"
    assert entries["preset_24gb"]["peak_gib"] > 0
    assert [r["threshold"] for r in entries["teacache"]["thresholds"]] == [0.2, 0.4]
    assert all(r["computed"] + r["reused"] >= 3 for r in entries["teacache"]["thresholds"])
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("| teacache |")  # the markdown table is printed last
