"""The `step1x-export` command line: a thin layer over the package's typed functions."""

from __future__ import annotations

import click

from .bench import bench
from .build import build
from .calibrate import calibrate
from .common import Step1XGroup
from .edit import demo, edit
from .export import export
from .models import models
from .plan import plan
from .quantize import quantize
from .serve import serve


@click.group(cls=Step1XGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="step1x-export")
def main() -> None:
    """Step1X-Edit, fast: reference model, ONNX export, INT8/FP8 calibration, runtime and benchmarks.

    Start with `step1x-export demo`: the toy model, a small Step1X-Edit trained here and shipped in the
    package, edits a photo on the CPU in seconds; `step1x-export models` lists what it can be asked.
    """


for command in (demo, models, edit, export, calibrate, build, bench, serve, plan, quantize):
    main.add_command(command)
