"""Every runtime optimisation is one toggle here, so a benchmark can walk the ladder one field at a time."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..precision import Precision

Backend = Literal["torch", "onnxruntime", "tensorrt"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class RuntimeOptions:
    """How `Step1XEditRuntime` runs. Defaults are on where lossless and supported.

    `cuda_graphs` and `compile` are requests: `resolved(device)` turns them off where they cannot run
    (CPU), and the runtime keeps the resolved copy, so `runtime.options` says what actually ran.
    """

    backend: Backend = "torch"
    precision: Precision = Precision.BF16  # the DiT's (and MLLM's) compute precision; the VAE runs in fp32
    cuda_graphs: bool = True  # capture the whole denoising step once per shape, replay it (torch / TensorRT)
    compile: bool = True  # torch.compile each DiT block (fuses elementwise work); torch backend on CUDA only
    attention_fp8: bool = False  # FP8 attention: not implemented
    sequential_load: bool = False  # load one stage at a time (encoder freed before the DiT): cards <= 24 GB

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.attention_fp8:
            raise NotImplementedError("RuntimeOptions.attention_fp8: FP8 attention is not implemented yet")

    def resolved(self, device: torch.device) -> RuntimeOptions:
        """The toggles that can take effect on `device`: graphs and compile need CUDA (and compile a torch DiT).

        ONNX Runtime runs on its own CUDA stream after a host sync, which a torch CUDA graph cannot capture
        (the sync fails during capture, and ORT's kernels would not be in the graph): no graphs there.
        """
        cuda = device.type == "cuda"
        graphs_ok = cuda and self.backend != "onnxruntime"
        compile_ok = cuda and self.backend == "torch"
        return replace(self, cuda_graphs=self.cuda_graphs and graphs_ok, compile=self.compile and compile_ok)
