"""`benchmarks/device.sh`'s CPU threads: one for a CPU dry run (`--device cpu`, or no GPU on the machine) unless the
caller exported OMP_NUM_THREADS; torch's own default on the GPU machine. Python and nvidia-smi are stand-ins that
print what the script hands them, so no benchmark runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_LIST = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"


def _run(tmp_path: Path, flags: list[str], *, gpu: bool, omp: str | None) -> str:
    """The OMP_NUM_THREADS the benchmark script would start under ('unset' when none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {"python3": 'echo "OMP=${OMP_NUM_THREADS-unset}"',
                 "nvidia-smi": f'echo "{GPU_LIST}"' if gpu else "exit 9"}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "OUT": str(tmp_path / "out"), "STEP1X_DEPS_DIR": str(tmp_path)}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "first_light", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1].removeprefix("OMP=")


@pytest.mark.parametrize(("flags", "gpu", "omp", "expected"), [
    (["--model", "tiny", "--device", "cpu"], True, None, "1"),  # a CPU dry run on the GPU machine
    (["--device=cpu"], True, None, "1"),
    (["--model", "tiny"], False, None, "1"),  # no GPU: everything runs on the CPU
    (["--model", "tiny", "--device", "cpu"], True, "3", "3"),  # the caller's own setting stands
    ([], True, None, "unset"),  # the GPU run: torch's default
    (["--device", "cuda"], True, None, "unset"),
])
def test_cpu_runs_get_one_thread_unless_the_caller_chose(tmp_path, flags, gpu, omp, expected):
    assert _run(tmp_path, flags, gpu=gpu, omp=omp) == expected
