"""Check a plan's activation peaks against what a CPU process really uses, for small configs.

Each stage is built exactly as the plan builds it (on meta), given real CPU storage (`to_empty`, then
filled so every page is resident), and run once in a fresh process: the rise of the process's peak
RSS (VmHWM, reset just before the forward) over its resident set then is the measured activation peak.
With a fixed mmap threshold every tensor above 64 KiB is mmap-ed and returned on free, so the resident
set follows the live tensors; what the CPU adds on top (oneDNN convolution workspaces and layout
copies, the math attention path for masked attention, allocator rounding) is the expected gap.

    python -m step1x_export.plan.measure  # prints plan vs measured for the configs below
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch

from .plan import stage_activations
from .stages import build_stage

MiB = 2**20
# (config, size_level, stage): big enough that activations dominate the RSS noise, small enough for CI.
CASES = (("tiny", 512, "vae_decoder"), ("tiny", 512, "vae_encoder"), ("tiny", 1024, "dit"), ("tiny", 1024, "mllm"))


def _stage(config: str, size_level: int, name: str):
    from ..step1x_ref.configs import get_config

    return build_stage(name, get_config(config), size_level, size_level, dtype=torch.float32, quant=None,
                       weight_only=None, mllm_quant=None)


def planned_activations(config: str, size_level: int, name: str) -> int:
    return stage_activations(_stage(config, size_level, name))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    """Set the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so building the stage does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_here(config: str, size_level: int, name: str) -> int:
    """Run the stage's forwards on CPU in this process; the peak RSS rise in bytes (call in a fresh process)."""
    torch.set_num_threads(1)  # per-thread scratch buffers stay one thread's
    s = _stage(config, size_level, name)
    s.module.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*s.module.parameters(), *s.module.buffers()):
            t.zero_()  # touch every page: the weights are resident before the forward starts
    for _, inputs in s.passes:
        inputs[:] = [torch.zeros(t.shape, dtype=t.dtype) for t in inputs]
    _reset_peak_rss()
    base = _rss_bytes()
    with torch.no_grad():
        for forward, inputs in s.passes:
            forward(*inputs)
    return _peak_rss_bytes() - base


def measure_cpu(config: str, size_level: int, name: str) -> int:
    """`measure_here` in a fresh Python process (a clean peak RSS)."""
    code = (f"from step1x_export.plan.measure import measure_here; "
            f"print(measure_here({config!r}, {size_level}, {name!r}))")
    # A fixed mmap threshold: glibc would otherwise raise it after each free, serve later tensors from the heap
    # and keep freed heap pages resident, so the RSS would follow the allocator's history, not the live tensors.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for config, level, name in CASES:
        planned, measured = planned_activations(config, level, name), measure_cpu(config, level, name)
        rows.append({"config": config, "size_level": level, "stage": name, "planned_mib": round(planned / MiB, 1),
                     "measured_mib": round(measured / MiB, 1), "measured_over_planned": round(measured / planned, 3)})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
