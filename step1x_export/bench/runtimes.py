"""`Step1XEditRuntime` over the benchmark's random-weight models: how the ladder and the device checks run
the product itself (its compile, graphs, quantized DiT and step timings), not a copy of its toggles."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..specs import dit_spec, vae_decoder_spec, vae_encoder_spec
from ..step1x_ref.configs import ModelConfig
from ..step1x_ref.vae.autoencoder import VAEDecoder, VAEEncoder
from ..step1x_ref.versions import edit_version
from .models import BenchModels, dit_inputs, synthetic_texts

if TYPE_CHECKING:
    from PIL import Image

    from ..runtime.options import RuntimeOptions
    from ..runtime.runtime import Step1XEditRuntime


class StubEncoder:
    """Stands in for the MLLM when it is not built: the benchmark's MLLM-shaped conditioning (120 / 100 kept
    tokens), whatever the image and instruction."""

    def __init__(self, config: ModelConfig, device: torch.device):
        x = dit_inputs(config, 32, 1, device)
        self.encoded: Any = (x.llm_embedding, x.llm_mask)
        if edit_version(config).trimmed_text:  # v1.2: one text per branch, its own length
            texts = synthetic_texts(config, 32, torch.Generator().manual_seed(7))
            self.encoded = [replace(t, **{f: getattr(t, f).to(device) for f in ("embedding", "text_embeds",
                                                                                  "text_mask")}) for t in texts]

    def __call__(self, instructions: list[str], image: Image.Image) -> Any:
        return self.encoded

    def close(self) -> None:
        pass  # shared by every runtime of the run


def bench_runtime(models: BenchModels, options: RuntimeOptions, encoder: Any = None) -> Step1XEditRuntime:
    """A `Step1XEditRuntime` over the bench's models (weights shared, not copied), run as `options` say.

    The runtime does what it does for a loaded model (compiles the DiT's blocks on load when `options`
    resolve to compile, captures graphs, times steps); closing it hands the modules back eager. Without
    an MLLM (`encoder` None and none built) a `StubEncoder` gives the conditioning.
    """
    from ..runtime.engines.torch_engine import TorchEncoder, TorchEngine
    from ..runtime.runtime import Step1XEditRuntime

    if models.ae is None:
        raise ValueError("a runtime needs the VAE: build the bench models with with_vae=True")
    c, dev, ae = models.config, models.device, models.ae
    if encoder is None:
        encoder = TorchEncoder(models.mllm) if models.mllm is not None and models.mllm.processor is not None \
            else StubEncoder(c, dev)
    loaders = {
        "encoder": lambda: encoder,
        "vae_encoder": lambda: TorchEngine(VAEEncoder(ae), vae_encoder_spec(c), models.vae_dtype, dev),
        "dit": lambda: TorchEngine(models.dit, dit_spec(c), options.precision.compute_dtype, dev),
        "vae_decoder": lambda: TorchEngine(VAEDecoder(ae), vae_decoder_spec(c), models.vae_dtype, dev),
    }
    return Step1XEditRuntime(c, loaders, options, dev, notes=("random weights (bench models)",))


def bench_picture(size: int) -> Image.Image:
    """A smooth RGB test picture (ramps), size x size: what the runtime-level benchmarks edit."""
    from PIL import Image

    ramp = torch.linspace(0, 255, size).to(torch.uint8)
    rgb = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                       torch.full((size, size), 128, dtype=torch.uint8)], dim=-1)
    return Image.fromarray(rgb.numpy())


class Shared:
    """An engine lent to several runtimes: closing a runtime leaves it open (its owner closes it)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def close(self) -> None:
        pass
