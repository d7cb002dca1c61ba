"""The GPU checks in one device call (under 8 minutes on an H100 / H200): the runtime as it ships
(`check_runtime.py`), quantized kernels and steps (`check_quant.py`), full-width ONNX export
(`check_export.py`).

    OUT=/some/dir bash benchmarks/device_checks.sh                          # what the device tool runs
    OUT=/tmp/dc bash benchmarks/device_checks.sh --model tiny --device cpu  # CPU dry run (a minute or two)

Every entry is in try/except (a failure is a row, not the end of the run), `$OUT/device_checks.json` is
rewritten after each one, entries that would start past `--budget-s` are skipped, the table is printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from check_export import export_checks
from check_quant import _short, quant_checks
from check_runtime import runtime_checks

from step1x_export.bench.checks import CheckReport, free, script_device, table
from step1x_export.bench.environment import environment_info, header_lines
from step1x_export.runtime.options import DEFAULT_GRAPH_CACHE
from step1x_export.step1x_ref.configs import get_config

CHECKS = ("runtime", "quant", "export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "device_checks_out")))
    p.add_argument("--model", default="v1.1", help="full-size config (v1.1 / v1.0); 'tiny' for a CPU dry run")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--sizes", default=None, help="square runtime sizes (default 512,1024; tiny 32,64)")
    p.add_argument("--aspects", type=int, default=4, help="other aspect ratios through the same runtime (0..4)")
    p.add_argument("--compare", type=int, default=2, help="how many of the sizes to compare with an eager runtime")
    p.add_argument("--graph-cache", type=int, default=DEFAULT_GRAPH_CACHE, help="RuntimeOptions.graph_cache")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of each runtime edit")
    p.add_argument("--edit-size", type=int, default=None, help="whole-edit size for peak memory (0: none)")
    p.add_argument("--edit-steps", type=int, default=4, help="steps of that edit (peak memory does not grow with it)")
    p.add_argument("--quant-size", type=int, default=None, help="quantized step size (default 1024; tiny 64)")
    p.add_argument("--export-size", type=int, default=None, help="export parity size (default 512; tiny 32)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per quantized step")
    p.add_argument("--budget-s", type=float, default=430.0, help="entries that would end after this are skipped")
    p.add_argument("--no-mllm", action="store_true", help="edits without the 7B-shaped MLLM (stub conditioning)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"which checks to run, in order ({', '.join(CHECKS)})")
    args = p.parse_args(argv)
    tiny = get_config(args.model).tiny_qwen is not None
    args.sizes = tuple(int(s) for s in (args.sizes or ("32,64" if tiny else "512,1024")).split(","))
    args.edit_size = args.edit_size if args.edit_size is not None else (64 if tiny else 512)
    args.quant_size = args.quant_size or (64 if tiny else 1024)
    args.export_size = args.export_size or (32 if tiny else 512)
    args.scale = 0.0 if tiny else 1.0  # budget estimates are for the full-size model
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        p.error(f"unknown check(s) {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = script_device(args.device, full_size=bool(args.scale))
    if isinstance(device, str):
        print(device)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on CPU is slow and not the point
    torch.backends.cuda.matmul.allow_tf32 = False
    config = get_config(args.model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment_info(device)
    conditions = {"model": args.model, "dtype": _short(dtype), "sizes": args.sizes, "steps": args.steps,
                  "edit": args.edit_size, "quant": args.quant_size, "export": args.export_size}
    print("\n".join(header_lines(env, conditions)), flush=True)
    config_dict = {k: v for k, v in vars(args).items() if k != "out_dir"} | {"argv": sys.argv[1:]}
    report = CheckReport(args.out_dir / "device_checks.json", env, config_dict, start, args.budget_s)
    report.data["notes"].append("random weights: latency and error figures only, no image quality")
    runs = {"runtime": lambda: runtime_checks(report, config, args, device, dtype),
            "quant": lambda: quant_checks(report, config, args, device, dtype),
            "export": lambda: export_checks(report, config, args, device)}
    for check in args.checks.split(","):
        runs[check.strip()]()
        free(device)
    report.data["notes"].append(f"total wall time {time.monotonic() - start:.1f} s")
    report.save()
    print("\n".join(header_lines(env, conditions)))
    print(table(report.data["entries"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
