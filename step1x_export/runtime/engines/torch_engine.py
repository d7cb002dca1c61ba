"""PyTorch modules as engines: named inputs from the spec -> named outputs.

The DiT may be quantized (per a calibration artifact) before it is wrapped, and the runtime may
compile its blocks (`compile.compile_blocks`); the engine only casts inputs to the spec's dtypes and
calls the module, and on close hands a shared module back uncompiled.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor, nn

from ...specs import ComponentSpec
from ...step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from .compile import uncompile_blocks


class TorchEngine:
    """`module(*inputs in spec order)` on `device`; "compute" tensors in `dtype`."""

    def __init__(self, module: nn.Module, spec: ComponentSpec, dtype: torch.dtype, device: torch.device | str):
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.module: nn.Module | None = module.to(self.device).eval().requires_grad_(False)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        if self.module is None:
            raise RuntimeError(f"{self.spec.name}: engine is closed")
        self.spec.check_inputs(inputs)
        args = [inputs[t.name].to(self.device, t.torch_dtype(self.dtype)) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, outs, strict=True))

    def close(self) -> None:
        if self.module is not None:
            uncompile_blocks(self.module)  # a module shared with a pipeline goes back eager
        self.module = None


class TorchEncoder:
    """The MLLM stage (vision + LLM, cond and uncond): one shared vision pass for the shared image."""

    def __init__(self, embedder: Qwen25VLEmbedder):
        self.embedder: Qwen25VLEmbedder | None = embedder

    def __call__(self, instructions: list[str], image: Image.Image) -> tuple[Tensor, Tensor]:
        if self.embedder is None:
            raise RuntimeError("encoder: engine is closed")
        with torch.inference_mode():
            return self.embedder(instructions, image)  # its forward runs the vision tower once for all

    def close(self) -> None:
        self.embedder = None

