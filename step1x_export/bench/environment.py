"""What every benchmark table carries: the device, its driver, library versions and the run's conditions.

Figures are only comparable within one run on one card (PERF.md), so the table says which card.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

LIBRARIES = ("torch", "transformers", "onnxruntime", "triton", "diffusers", "numpy")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_driver() -> str:
    """The driver version from nvidia-smi; 'n/a' without one (CPU machines, containers without the tool)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "n/a"


def environment_info(device: torch.device | str) -> dict[str, str]:
    """Device name, driver, CUDA, library versions and host: printed above every table, stored in JSON/CSV."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        driver, cuda = _nvidia_driver(), str(torch.version.cuda)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU {cpu} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
        driver, cuda = "n/a", "n/a"
    info = {"device": name, "driver": driver, "cuda": cuda, "python": platform.python_version()}
    info.update({lib: _version(lib) for lib in LIBRARIES})
    info["torch"] = torch.__version__  # the runtime version string (e.g. 2.11.0+cu130), not the dist name
    return info


def header_lines(env: dict[str, str], conditions: dict[str, object]) -> list[str]:
    """Two-line header for a text table: the device line and the conditions line."""
    libs = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "onnxruntime", "triton") if k in env)
    cond = ", ".join(f"{k}={v}" for k, v in conditions.items())
    return [f"device: {env['device']} | driver {env['driver']} | cuda {env['cuda']} | {libs}", f"conditions: {cond}"]
