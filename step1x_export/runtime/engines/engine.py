"""The one engine protocol: named input tensors -> named output tensors, per a ComponentSpec.

PyTorch modules, ONNX Runtime sessions and TensorRT engines all implement it, so the
denoising loop and the pipeline never branch on backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ...specs import ComponentSpec


@runtime_checkable
class Engine(Protocol):
    spec: ComponentSpec

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run once; inputs and outputs are keyed by the spec's tensor names."""
        ...

    def close(self) -> None:
        """Release device memory held by the engine."""
        ...
