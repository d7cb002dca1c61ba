"""The CLI commands not covered elsewhere: calibrate -> edit --quant, build without TensorRT, --help."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from step1x_export.calibrate.artifact import load_artifact
from step1x_export.cli import main
from step1x_export.files import current_umask


def run(args: list[str]):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("command", ["demo", "models", "edit", "export", "calibrate", "build", "bench"])
def test_every_command_has_complete_help(command: str) -> None:
    result = run([command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output and "--help" in result.output


def test_calibrate_then_edit_with_the_artifact(tmp_path: Path) -> None:
    art = tmp_path / "int8.safetensors"
    result = run(["calibrate", "--model", "tiny", "--recipe", "int8-sq", "--samples", "2", "--steps", "2",
                  "--size-level", "32", "--out", str(art), "--quiet"])
    assert result.exit_code == 0, result.output
    assert art.stat().st_mode & 0o777 == 0o666 & ~current_umask(), oct(art.stat().st_mode)  # as every output
    artifact = load_artifact(art)
    assert artifact.recipe == "int8-sq" and len(artifact.layers) > 0
    assert artifact.calibration["steps"] == 2 and artifact.calibration["size_level"] == 32

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    result = run(["edit", "--model", "tiny", "--quant", str(art), "--image", str(src), "--prompt", "add a hat",
                  "--out", str(out), "--steps", "2", "--size-level", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (56, 40)

    result = run(["calibrate", "--model", "tiny", "--recipe", "fp8", "--out", str(tmp_path / "no" / "a.safetensors")])
    assert result.exit_code != 0 and "does not exist" in result.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the message shown without it")
def test_build_without_tensorrt_says_how_to_get_it(tmp_path: Path) -> None:
    result = run(["build", "--onnx-dir", str(tmp_path), "--out", str(tmp_path / "engines")])
    assert result.exit_code != 0
    assert "TensorRT is not installed: pip install 'step1x-export[tensorrt]'" in result.output


def test_help_names_the_toy_and_shows_an_edit():
    top = run(["--help"]).output
    assert "random-weight" not in top and "the toy model" in top and "step1x-export models" in top
    edit_help = run(["edit", "--help"]).output
    assert "Example" in edit_help and "step1x-export edit --model toy --image in.png" in edit_help
    assert "--threads" in edit_help and "--strict" in edit_help and "--text-to-image" in edit_help
