"""Every user mistake ends in one line, a non-zero exit, no traceback and no output file.

One test per class of mistake: numbers (NaN, infinity, out of range), devices, the output path, the input
image, the model folder, an over-long instruction, Ctrl-C, file modes, and a stage that yields NaN. The
output path and the numbers are checked before any model work: these tests make loading a model fail
loudly, so a check that came too late would show.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli import main
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.validate import InputError, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--steps", "1", "--size-level", "32", "--quiet"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading any model is an error: the mistake must be caught before."""

    def refuse(*args, **kwargs):
        raise AssertionError("model work started before the mistake was refused")

    monkeypatch.setattr(Step1XEditRuntime, "load", refuse)


@pytest.fixture
def built_once(monkeypatch, tiny_pipe):
    """`--model tiny` reuses the session's tiny pipeline (same seed, same weights) instead of building its own."""
    original = Step1XEditPipeline.random

    def cached(name: str = "tiny", *, seed: int = 0, dtype=torch.float32) -> Step1XEditPipeline:
        same = (name, seed, dtype) == ("tiny", 0, torch.float32)
        return tiny_pipe if same else original(name, seed=seed, dtype=dtype)

    monkeypatch.setattr(Step1XEditPipeline, "random", staticmethod(cached))


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def assert_refused(result, *needles: str, code: int | None = None) -> None:
    """Non-zero exit, the message named, one `Error:` line, no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, result.output)


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize(("option", "value"), [
    ("--cfg", "nan"), ("--cfg", "inf"), ("--cfg", "-1"), ("--cfg", "1e9"), ("--seed", str(2**70)),
    ("--seed", "-1"), ("--steps", "0"), ("--size-level", "100000"),
])
def test_bad_numbers_are_refused_before_any_model_work(tmp_path, image, no_model_work, option, value):
    before = files_in(tmp_path)
    result = run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                  option, value])
    assert_refused(result, option, code=2)
    assert files_in(tmp_path) == before


def test_bad_numbers_are_refused_by_the_api(tiny_pipe):
    pipe = tiny_pipe
    rt = Step1XEditRuntime.from_pipeline(pipe)
    img = Image.new("RGB", (32, 32))
    for kwargs, name in (({"cfg": math.nan}, "cfg"), ({"cfg": math.inf}, "cfg"), ({"seed": 2**70}, "seed"),
                         ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"size_level": 8}, "size_level")):
        with pytest.raises(InputError, match=rf"^{name} must"):
            rt.edit(img, "x", **kwargs)
        with pytest.raises(InputError, match=rf"^{name} must"):
            pipe.edit(img, "x", **kwargs)
    assert "mllm" not in rt.timer.resolve()  # refused before the first stage
    rt.close()


@pytest.mark.parametrize(("device", "needle"), [("tpu9", "not a torch device"), ("cuda:x", "not a torch device"),
                                                ("meta", "not available")])
def test_bad_devices_are_refused(tmp_path, image, no_model_work, device, needle):
    result = run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                  "--device", device])
    assert_refused(result, "--device", needle, code=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, image, no_model_work):
    for command in (["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png")],
                    ["calibrate", "--model", "tiny", "--recipe", "fp8", "--out", str(tmp_path / "a.safetensors")],
                    ["bench", "--out-dir", str(tmp_path / "b")]):
        assert_refused(run([*command, "--device", "cuda"]), "--device", "no CUDA GPU", code=2)
    assert files_in(tmp_path) == {"in.png"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_api_refuses_cuda_without_a_gpu():
    with pytest.raises(InputError, match="no CUDA GPU"):
        Step1XEditRuntime.load("tiny", device="cuda")


def test_output_path_mistakes_are_refused_before_any_model_work(tmp_path, image, no_model_work):
    (tmp_path / "taken.png").mkdir()
    cases = [(tmp_path / "taken.png", "is a directory"), (tmp_path / "no" / "o.png", "does not exist"),
             (tmp_path / "o.gif", "unknown file type")]
    for out, needle in cases:
        assert_refused(run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(out)]), needle, code=1)
    assert_refused(run(["calibrate", "--model", "tiny", "--recipe", "fp8", "--out", str(tmp_path / "taken.png")]),
                   "is a directory", code=1)


def test_input_mistakes_name_the_file(tmp_path, image, no_model_work):
    out = tmp_path / "o.png"
    result = run(["edit", *FAST, "--image", str(tmp_path), "--prompt", "x", "--out", str(out)])
    assert_refused(result, "is a directory", code=1)
    (tmp_path / "q").mkdir()
    result = run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(out), "--quant",
                  str(tmp_path / "q")])
    assert_refused(result, "--quant", code=2)


def test_qwen_folder_without_weights_is_refused(tmp_path, image):
    model = tmp_path / "model"
    (model / "Qwen2.5-VL-7B-Instruct").mkdir(parents=True)
    (model / "Qwen2.5-VL-7B-Instruct" / "config.json").write_text("{}")
    for name in ("step1x-edit-v1p1-official.safetensors", "vae.safetensors"):
        (model / name).write_bytes(b"")
    out = tmp_path / "o.png"
    result = run(["edit", "--model-dir", str(model), "--image", str(image), "--prompt", "x", "--out", str(out),
                  "--quiet"])
    assert_refused(result, "Qwen2.5-VL-7B-Instruct has config.json but no weights", code=1)
    assert not out.exists()


def test_long_instruction_is_cut_and_announced(tmp_path, image, built_once):
    out = tmp_path / "o.png"
    result = run(["edit", *FAST, "--image", str(image), "--prompt", "make it red " * 9000, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: text too long" in result.output and "'make it red make it red" in result.output
    assert "tokens are ignored" in result.output
    assert out.is_file()


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, image, monkeypatch, built_once):
    """Interrupted while the image is being written: the half-written temporary file is removed."""
    original = Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)  # the temporary file is complete on disk ...
        raise KeyboardInterrupt  # ... and the rename never happens

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    before = files_in(tmp_path)
    result = run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "Traceback" not in result.output
    assert files_in(tmp_path) == before


def test_sigint_exits_130_and_leaves_nothing(tmp_path, image):
    """A real Ctrl-C (SIGINT) in the middle of the denoising loop of a real process."""
    out = tmp_path / "o.png"
    cmd = [sys.executable, "-m", "step1x_export.cli", "edit", "--model", "tiny", "--steps", "1000",
           "--size-level", "32", "--image", str(image), "--prompt", "x", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    seen = b""
    while b"denoising" not in seen and time.monotonic() < deadline:  # the progress bar is drawn: in the loop
        seen += os.read(proc.stderr.fileno(), 4096)
    assert b"denoising" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen + err).decode()
    assert b"Traceback" not in err and b"interrupted" in err
    assert files_in(tmp_path) == {"in.png"}


def test_outputs_follow_the_umask(tmp_path, image, built_once):
    for umask in (0o022, 0o077):
        out = tmp_path / f"o{umask:o}.png"
        old = os.umask(umask)
        try:
            result = run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(out)])
        finally:
            os.umask(old)
        assert result.exit_code == 0, result.output
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask, oct(out.stat().st_mode)


def test_a_nan_stage_is_an_error_not_a_picture(tmp_path, image, monkeypatch, tiny_pipe):
    poisoned = copy.copy(tiny_pipe)  # the same MLLM and VAE; a DiT whose every prediction is NaN
    poisoned.model = copy.deepcopy(tiny_pipe.model)
    with torch.no_grad():
        poisoned.model.final_layer.linear.bias.fill_(math.nan)
    rt = Step1XEditRuntime.from_pipeline(poisoned)
    with pytest.raises(NonFiniteError, match=r"^denoising \(final latent\) produced \d+ non-finite"):
        rt.edit(Image.new("RGB", (32, 32)), "x", steps=1, size_level=32)
    with pytest.raises(NonFiniteError, match=r"^denoising"):
        poisoned.edit(Image.new("RGB", (32, 32)), "x", steps=1, size_level=32)
    monkeypatch.setattr(Step1XEditPipeline, "random", staticmethod(lambda *a, **k: poisoned))
    result = run(["edit", *FAST, "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert_refused(result, "denoising (final latent) produced", "no image is written", code=1)
    assert files_in(tmp_path) == {"in.png"}


def test_a_forgotten_image_is_refused_not_turned_into_text_to_image(tmp_path, no_model_work):
    result = run(["edit", *FAST, "--prompt", "make it black and white", "--out", str(tmp_path / "o.png")])
    assert_refused(result, "give --image FILE to edit a picture, or --text-to-image", code=2)
    result = run(["edit", *FAST, "--text-to-image", "--image", str(tmp_path / "in.png"), "--prompt", "x",
                  "--out", str(tmp_path / "o.png")])
    assert_refused(result, "--text-to-image", code=2)


def test_text_to_image_asked_for_runs(tmp_path, built_once):
    out = tmp_path / "t2i.png"
    result = run(["edit", "--model", "tiny", "--steps", "1", "--quiet", "--text-to-image", "--width", "32",
                  "--prompt", "a red bicycle", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 32)


def test_a_picture_over_the_servers_pixel_limit_is_refused_everywhere(tmp_path, no_model_work, tiny_pipe):
    """6000x4000 (24 MP): the server's default limit is 16 MP, and the command line and the API hold the same."""
    from step1x_export.serve.request import ParamRules, RequestError, decode_image

    photo = tmp_path / "photo.png"
    Image.new("1", (6000, 4000)).save(photo)
    result = run(["edit", *FAST, "--image", str(photo), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert_refused(result, "is 6000x4000 (24.0 MP); the limit is 16.0 MP", code=1)
    with pytest.raises(ValueError, match=r"is 6000x4000 \(24.0 MP\); the limit is 16.0 MP"):
        Step1XEditRuntime.from_pipeline(tiny_pipe).edit(Image.new("L", (6000, 4000)), "x", steps=1, size_level=32)
    with pytest.raises(RequestError, match="the limit is 16.0 MP") as refused:
        decode_image(photo.read_bytes(), ParamRules(max_steps=1, min_size_level=16, max_size_level=64,
                                                    default_size_level=32).max_pixels)
    assert refused.value.status == 413
    assert files_in(tmp_path) == {"photo.png"}


def test_a_size_level_the_toy_did_not_learn_is_refused_by_cli_and_api(tmp_path, image):
    """The toy learned 64..160: 1024 once ran minutes and gave a flat picture; now one line, before the MLLM."""
    result = run(["edit", "--model", "toy", "--steps", "1", "--size-level", "1024", "--image", str(image),
                  "--prompt", "make it darker", "--out", str(tmp_path / "o.png"), "--quiet"])
    assert_refused(result, "size_level 1024 is outside what the toy model learned (64..160)", code=1)
    assert_refused(run(["demo", "--size-level", "48", "--out", str(tmp_path / "d.png")]),
                   "size_level 48 is outside what the toy model learned", code=1)
    with Step1XEditRuntime.load("toy", device="cpu") as rt:
        with pytest.raises(InputError, match=r"^size_level 161 is outside what the toy model learned"):
            rt.edit(Image.new("RGB", (64, 64)), "make it darker", steps=1, size_level=161)
        assert "mllm" not in rt.timer.resolve()  # refused before the first stage
    assert files_in(tmp_path) == {"in.png"}
