"""The command line answers at once: the group's and every command's `--help` are built without importing
torch or any other heavy library (those load when a command runs), and the choices they list are the
ones the implementing modules use."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from step1x_export import choices

HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "PIL", "safetensors", "tqdm",
         "skimage", "ray", "fastapi")

HELP_EVERYWHERE = f"""
import json, sys
from click.testing import CliRunner
from step1x_export.cli import main
runner = CliRunner()
commands = [[]] + [[name] for name in main.list_commands(None)]
failed = [c for c in commands if runner.invoke(main, [*c, "--help"]).exit_code != 0]
print(json.dumps({{"commands": len(commands), "failed": failed,
                   "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_help_of_every_command_imports_no_heavy_library() -> None:
    result = subprocess.run([sys.executable, "-c", HELP_EVERYWHERE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["commands"] >= 10 and report["failed"] == []
    assert report["heavy"] == []


def test_module_entry_help_imports_no_torch() -> None:
    """`python -m step1x_export.cli --help`, as the console script runs it."""
    code = ("import runpy, sys\nsys.argv = ['step1x-export', '--help']\ntry:\n"
            "    runpy.run_module('step1x_export.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: step1x-export" in result.stdout and result.stdout.rstrip().endswith("NO-TORCH")


def test_choices_are_the_implementations_names() -> None:
    from step1x_export.calibrate.qcheckpoint import DTYPES as CHECKPOINT_DTYPES
    from step1x_export.calibrate.recipes import RECIPES
    from step1x_export.calibrate.weight_only import WEIGHT_ONLY_FORMATS
    from step1x_export.cli.common import torch_dtype
    from step1x_export.plan.plan import PRESETS
    from step1x_export.runtime.engines.mllm import MLLM_QUANT_FORMATS

    assert tuple(RECIPES) == choices.RECIPES
    assert tuple(WEIGHT_ONLY_FORMATS) == choices.WEIGHT_ONLY
    assert MLLM_QUANT_FORMATS == choices.MLLM_QUANT
    assert tuple(PRESETS) == choices.PLAN_PRESETS
    dtypes = [torch_dtype(name) for name in choices.DTYPES]
    assert set(dtypes) == set(CHECKPOINT_DTYPES.values()) and all(d.is_floating_point for d in dtypes)
    assert torch_dtype("bf16") is torch.bfloat16
