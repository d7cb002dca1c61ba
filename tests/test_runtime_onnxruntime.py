"""The runtime on the ONNX Runtime backend (tiny model, fp32 graphs) against the reference pipeline.

ORT and torch run the same fp32 maths with different kernels: the final latents are compared by relative
error (max |a - b| / max |b|), which must stay at the level of fp32 rounding, not by 8-bit image PSNR.
"""

from __future__ import annotations

import pytest
import test_runtime as base

from step1x_export.runtime import ProfileError, Step1XEditRuntime
from step1x_export.runtime import runtime as runtime_module

pytestmark = pytest.mark.xdist_group("tiny_export")  # shares the session's one tiny export

EDIT, PROMPT = base.EDIT, base.PROMPT
image, reference_run = base.image, base.reference_run  # the same module-scoped fixtures
LATENT_TOL = 1e-5


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.mark.isa
def test_onnxruntime_backend_equals_reference(export_dir, image, reference_run):
    with Step1XEditRuntime.load(export_dir, "onnxruntime", device="cpu", seed=0) as rt:
        out, latent = base.edit_and_latent(runtime_module, rt.edit, image, PROMPT, **EDIT)
        err = base.rel_err(latent, reference_run[1])
        print(f"onnxruntime backend vs reference, fp32: final latent max rel err {err:.2e}; {rt.notes}")
        assert out.size == reference_run[0].size
        assert err <= LATENT_TOL
        assert rt.default_size_level == 256  # the export's model (tiny): inside its profile
        with pytest.raises((ProfileError, ValueError), match="dit|vae_encoder"):
            rt.edit(image, PROMPT, seed=0, steps=1, size_level=1024)  # outside the tiny export's profile


def test_torch_backend_on_an_export_names_the_backends_that_load_it(export_dir, tmp_path):
    with pytest.raises(ValueError, match=r"export/engine folder \(manifest.json: backend 'onnxruntime'.*model folder"):
        Step1XEditRuntime.load(export_dir, backend="torch", device="cpu")
    (tmp_path / "engines.json").write_text("{}")  # an engine folder is recognised by its manifest's name alone
    with pytest.raises(ValueError, match=r"engines.json: backend 'tensorrt'.*--backend tensorrt"):
        Step1XEditRuntime.load(tmp_path, backend="torch", device="cpu")
