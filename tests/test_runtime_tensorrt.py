"""TensorRT build and run on a GPU (skipped where TensorRT or CUDA is absent): the tiny VAE decoder
exported to ONNX, built with a profile from the spec, equals torch eagerly and under a CUDA graph."""

from __future__ import annotations

import pytest
import torch

trt = pytest.importorskip("tensorrt")
if not torch.cuda.is_available():
    pytest.skip("TensorRT engines need a CUDA GPU", allow_module_level=True)

from step1x_export.precision import Precision  # noqa: E402
from step1x_export.runtime import BufferPool, CudaGraphed, profile_shapes  # noqa: E402
from step1x_export.runtime.engines.trt_build import BuildInput, BuildOptions, build_all  # noqa: E402
from step1x_export.runtime.engines.trt_engine import TensorRTEngine  # noqa: E402
from step1x_export.runtime.engines.trt_manifest import EngineManifest, current_platform  # noqa: E402
from step1x_export.specs import dim_ranges, vae_decoder_spec  # noqa: E402
from step1x_export.step1x_ref.configs import get_config  # noqa: E402
from step1x_export.step1x_ref.vae.autoencoder import AutoEncoder, VAEDecoder  # noqa: E402
from step1x_export.step1x_ref.weights.random_weights import randomize_  # noqa: E402


def test_build_and_run_vae_decoder(tmp_path):
    config = get_config("tiny")
    spec, ranges = vae_decoder_spec(config), dim_ranges(config)
    module = VAEDecoder(randomize_(AutoEncoder(config.vae), 1)).eval().cuda()
    latent = torch.randn(1, 16, 6, 8, device="cuda")
    onnx_path = tmp_path / "vae_decoder.onnx"
    torch.onnx.export(module, (latent,), str(onnx_path), input_names=spec.input_names,
                      output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(), dynamo=False)
    options = BuildOptions(strongly_typed=True, opt_level=2, timing_cache=tmp_path / "cache.bin")
    item = BuildInput("vae_decoder", onnx_path, spec, ranges, Precision.FP32)
    build_all("tiny", [item], tmp_path / "engines", options)
    manifest = EngineManifest.read(tmp_path / "engines")
    manifest.check_platform(current_platform())
    assert (tmp_path / "cache.bin").stat().st_size > 0
    assert manifest.components["vae_decoder"].profiles == [profile_shapes(spec, ranges)]

    engine = TensorRTEngine(tmp_path / "engines" / "vae_decoder.plan", spec,
                            manifest.components["vae_decoder"].profiles, BufferPool("cuda"))
    with torch.inference_mode():
        want = module(latent)
    got = engine(latent=latent)["image"]
    rel = ((got - want).norm() / want.norm()).item()
    graphed = CudaGraphed(lambda x: engine(latent=x)["image"], enabled=True)
    replay = graphed(latent)
    print(f"TensorRT vs torch rel err {rel:.2e}; graph replay vs eager max abs {(replay - got).abs().max():.2e}")
    assert rel < 1e-2
    assert torch.equal(replay, got)
    engine.close()
