"""The reference edit end to end on the tiny model, and the CLI's handling of bad input.

Identical fp32 computations are compared bit for bit on the final latent (`torch.equal`); "this input
changes the edit" is a relative difference on the latent far above fp32 rounding.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_runtime import edit_and_latent, rel_err

from step1x_export.cli import main
from step1x_export.step1x_ref import pipeline as pipeline_module
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.versions import v1x

FAST = ["--model", "tiny", "--steps", "2", "--size-level", "64", "--quiet"]


@pytest.fixture(scope="module")
def pipe() -> Step1XEditPipeline:
    return Step1XEditPipeline.random("tiny", seed=0)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 80 * 60 * 3).reshape(60, 80, 3)
    return Image.fromarray((base * 0.7 + rng.uniform(0, 70, base.shape)).astype(np.uint8))


def latent_of(pipe: Step1XEditPipeline, *args, **kwargs) -> tuple[Image.Image, torch.Tensor]:
    return edit_and_latent(pipeline_module, pipe.edit, *args, **kwargs)


def test_seeded_edit_is_deterministic(pipe: Step1XEditPipeline, photo: Image.Image) -> None:
    a, la = latent_of(pipe, photo, 'Change the text to "HELLO"', seed=3, steps=3, size_level=64)
    b, lb = latent_of(pipe, photo, 'Change the text to "HELLO"', seed=3, steps=3, size_level=64)
    _, lc = latent_of(pipe, photo, 'Change the text to "HELLO"', seed=4, steps=3, size_level=64)
    assert a.size == photo.size  # resized back to the input's size
    assert torch.equal(la, lb) and np.array_equal(np.asarray(a), np.asarray(b))
    assert rel_err(lc, la) > 0.1  # another seed gives another latent: the seed is used
    assert set(pipe.timer.resolve()) >= {"preprocess", "mllm", "vae_encode", "denoise", "vae_decode"}


def test_instruction_changes_the_edit(pipe: Step1XEditPipeline, photo: Image.Image) -> None:
    _, la = latent_of(pipe, photo, "make it red", seed=1, steps=2, size_level=64)
    _, lb = latent_of(pipe, photo, "", seed=1, steps=2, size_level=64)  # empty instruction: allowed upstream
    assert rel_err(la, lb) > 1e-3  # far above fp32 rounding (~1e-7): the instruction reaches the DiT


class _Stop(Exception):
    pass


def test_default_size_level_follows_the_model(pipe: Step1XEditPipeline, photo: Image.Image) -> None:
    """No size_level: the tiny model's own (its profile's top, 256), not the real model's 1024."""
    seen = []

    def record(image, size_level, *rest):
        seen.append(size_level)
        raise _Stop  # the size is all this test needs: stop before the model runs

    with mock.patch.object(v1x, "prepare_image", record), pytest.raises(_Stop):
        pipe.edit(photo, "x", seed=0, steps=1)
    assert seen == [256]


def write(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def test_cli_edit_writes_image(tmp_path: Path, photo: Image.Image) -> None:
    src = write(photo, tmp_path / "in.png")
    out = tmp_path / "out.jpg"
    result = run(["edit", *FAST, "--image", str(src), "--prompt", "add a hat", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == photo.size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16"])
def test_cli_converts_modes_and_says_so(tmp_path: Path, photo: Image.Image, mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    else:
        img = photo.convert(mode)
    src = write(img, tmp_path / "in.png")
    out = tmp_path / "out.png"
    result = run(["edit", *FAST, "--image", str(src), "--prompt", "x", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists()
    if mode in ("RGBA", "I;16"):
        assert "warning" in result.output


def test_cli_bad_inputs_fail_cleanly(tmp_path: Path, photo: Image.Image) -> None:
    good = write(photo, tmp_path / "in.png")
    tiny = write(photo.resize((12, 40)), tmp_path / "tiny.png")
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:100])
    out = tmp_path / "out.png"
    cases = [
        (["--image", str(tmp_path / "absent.png")], "does not exist"),
        (["--image", str(corrupt)], "cannot read image"),
        (["--image", str(tiny)], "at least 16 px"),
        (["--image", str(huge)], "MP"),
    ]
    for extra, message in cases:
        result = run(["edit", *FAST, "--prompt", "x", "--out", str(out), *extra])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
    result = run(["edit", *FAST, "--image", str(good), "--prompt", "x", "--out", str(tmp_path / "no" / "o.png")])
    assert result.exit_code != 0 and "does not exist" in result.output
    result = run(["edit", "--model-dir", str(tmp_path / "nope"), "--image", str(good), "--prompt", "x",
                  "--out", str(out)])
    assert result.exit_code != 0 and "nope" in result.output
    assert not out.exists()


def test_demo_runs(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    result = run(["demo", "--model", "tiny", "--out", str(out), "--steps", "2", "--size-level", "64"])
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output and "denoise" in result.output
    assert Image.open(out).size == (64, 64)  # the edit resolution


def test_official_layout_roundtrip(tmp_path: Path, pipe: Step1XEditPipeline, photo: Image.Image) -> None:
    """A model dir in the official layout loads through the real loading code and edits identically."""
    files = pipe.save_pretrained(tmp_path / "model")
    assert files.dit.name == "step1x-edit-v1p1-official.safetensors" and files.vae.name == "vae.safetensors"
    loaded = Step1XEditPipeline.from_pretrained(tmp_path / "model", "v1.1", config=pipe.config, dtype=pipe.dtype)
    _, a = latent_of(pipe, photo, "add snow", seed=5, steps=2, size_level=64)
    _, b = latent_of(loaded, photo, "add snow", seed=5, steps=2, size_level=64)
    assert torch.equal(a, b)  # the same fp32 weights through the real loading code: bit-identical
