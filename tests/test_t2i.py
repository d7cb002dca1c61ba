"""Text-to-image as upstream's inference.py runs it (no reference image: a blank 1024x1024 image to the MLLM,
no reference tokens, --width/--height), through the reference, the torch runtime and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli import main
from step1x_export.export import load_manifest
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime.engines.onnxruntime import OrtEngine
from step1x_export.step1x_ref.pipeline import T2I_NEGATIVE_PROMPT, Step1XEditPipeline
from step1x_export.step1x_ref.sampling import position_ids

pytestmark = pytest.mark.xdist_group("tiny_export")  # the ONNX Runtime test shares the session's tiny export

T2I = {"seed": 2, "steps": 3, "cfg": 6.0, "width": 64, "height": 48}
PROMPT = "a red bicycle"


@pytest.fixture(scope="module")
def reference(tiny_pipe) -> Image.Image:
    return tiny_pipe.edit(None, PROMPT, **T2I)


def test_t2i_inputs_follow_upstream(tiny_pipe: Step1XEditPipeline) -> None:
    seen = {}

    def spy(instructions, image):
        seen["instructions"], seen["image"] = instructions, image
        return real(instructions, image)

    real = tiny_pipe.embedder.forward
    tiny_pipe.embedder.forward = spy  # type: ignore[method-assign]
    try:
        inputs = tiny_pipe.prepare(None, PROMPT, seed=0, steps=2, size_level=0, width=64, height=48)
    finally:
        del tiny_pipe.embedder.forward
    assert seen["instructions"] == [PROMPT, T2I_NEGATIVE_PROMPT]  # inference.py's t2i negative prompt
    assert seen["image"].size == (1024, 1024) and not np.asarray(seen["image"]).any()  # Image.new: black
    n = (64 // 16) * (48 // 16)
    assert inputs.noise.shape == (1, n, 64) and inputs.ref.shape == (1, 0, 64)
    ids = position_ids(inputs.llm_embedding.shape[1], 3, 4, "v1.1", reference=False)
    assert ids.shape[1] == inputs.llm_embedding.shape[1] + n  # text + noisy tokens only (prepare_t2i)
    assert torch.equal(ids[0, -n:], position_ids(0, 3, 4, "v1.1")[0, :n])


def test_t2i_dit_sees_only_the_noisy_tokens(tiny_pipe: Step1XEditPipeline) -> None:
    shapes = []
    hook = tiny_pipe.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        out = tiny_pipe.edit(None, PROMPT, steps=1, width=32, height=32)
    finally:
        hook.remove()
    assert shapes == [(2, 4, 64)] and out.size == (32, 32)


def test_t2i_runtime_torch_equals_reference(reference: Image.Image) -> None:
    with Step1XEditRuntime.load("tiny", seed=0, device="cpu") as rt:
        out = rt.edit(None, PROMPT, **T2I)
        assert "vae_encode" not in rt.timings and "denoise" in rt.timings
    assert out.size == (64, 48) and np.array_equal(np.asarray(out), np.asarray(reference))


@pytest.mark.isa
def test_t2i_onnxruntime_equals_reference(tiny_pipe, tiny_export: Path, reference: Image.Image) -> None:
    # one denoising step's DiT on text-to-image inputs (N tokens, not 2N): the graph vs the torch model
    inputs = tiny_pipe.prepare(None, PROMPT, seed=0, steps=2, size_level=0, width=64, height=48)
    feed = {"img": torch.cat([inputs.noise] * 2), "pe": inputs.pe, "timestep": torch.tensor([0.9, 0.9]),
            "llm_embedding": inputs.llm_embedding, "llm_mask": inputs.llm_mask}
    entry = load_manifest(tiny_export).components["dit"]
    got = OrtEngine(entry.path, entry.spec)(**feed)["pred"]
    with torch.no_grad():
        want = tiny_pipe.model(*feed.values())
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"t2i DiT step, onnxruntime vs torch (fp32): max rel err {rel:.2e}")
    assert got.shape == (2, 12, 64) and rel < 1e-5

    with Step1XEditRuntime.load(tiny_export, "onnxruntime", device="cpu", seed=0) as rt:
        out = rt.edit(None, PROMPT, **T2I)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    print(f"t2i onnxruntime vs torch reference (fp32): max |diff| {diff.max()} levels, mean {diff.mean():.4f}")
    assert out.size == reference.size and diff.max() <= 1  # fp32 graphs: at most one rounding step apart


def test_t2i_cli(tmp_path: Path) -> None:
    out = tmp_path / "t2i.png"
    run = CliRunner().invoke
    result = run(main, ["edit", "--model", "tiny", "--prompt", PROMPT, "--out", str(out), "--steps", "1",
                        "--width", "64", "--height", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 32)
    result = run(main, ["edit", "--model", "tiny", "--prompt", PROMPT, "--out", str(out), "--width", "50"])
    assert result.exit_code == 1 and "width must be a multiple of 16" in result.output
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(src)
    result = run(main, ["edit", "--model", "tiny", "--image", str(src), "--prompt", "x", "--out", str(out),
                        "--width", "64"])
    assert result.exit_code == 2 and "--width/--height set a text-to-image size" in result.output
