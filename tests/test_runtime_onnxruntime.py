"""The runtime on the ONNX Runtime backend (tiny model, fp32 graphs) equals the reference pipeline."""

from __future__ import annotations

import pytest
import test_runtime as base

from step1x_export.runtime import ProfileError, Step1XEditRuntime

pytestmark = pytest.mark.xdist_group("tiny_export")  # shares the session's one tiny export

EDIT, PROMPT, psnr = base.EDIT, base.PROMPT, base.psnr
image, reference = base.image, base.reference  # the same module-scoped fixtures


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


def test_onnxruntime_backend_equals_reference(export_dir, image, reference):
    with Step1XEditRuntime.load(export_dir, "onnxruntime", device="cpu", seed=0) as rt:
        out = rt.edit(image, PROMPT, **EDIT)
        figure = psnr(out, reference)
        print(f"onnxruntime backend vs reference, fp32: PSNR {figure:.1f} dB; {rt.notes}")
        assert figure >= 40.0
        with pytest.raises((ProfileError, ValueError), match="dit|vae_encoder"):
            rt.edit(image, PROMPT, seed=0, steps=1, size_level=1024)  # outside the tiny export's profile
