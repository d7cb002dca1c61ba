"""What a server loads and the limits it enforces: plain data, so a Ray replica can be handed them by pickle."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.options import BACKENDS

if TYPE_CHECKING:
    from ..runtime import Step1XEditRuntime

DTYPE_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RuntimeSpec:
    """How to build the `Step1XEditRuntime` that serves edits (the arguments of `Step1XEditRuntime.load`)."""

    source: str  # a tiny config name, a model dir (torch) or an export / engine dir
    backend: str = "torch"
    quant: str | None = None  # calibration artifact applied to the torch DiT
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: the runtime's default for the device and model
    cuda_graphs: bool = True
    compile: bool = True
    sequential_load: bool = False
    version: str = "v1.1"
    mllm: str | None = None  # engine backends: Qwen2.5-VL dir or tiny config name for the torch MLLM
    seed: int = 0  # weight seed of tiny random-weight models

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")

    def load(self) -> Step1XEditRuntime:
        import torch

        from ..runtime import Step1XEditRuntime

        dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.dtype]) \
            if self.dtype else None
        return Step1XEditRuntime.load(
            self.source, self.backend, quant=self.quant, device=self.device, dtype=dtype,  # type: ignore[arg-type]
            cuda_graphs=self.cuda_graphs, compile=self.compile, sequential_load=self.sequential_load,
            version=self.version, mllm=self.mllm, seed=self.seed,
        )

    def identity(self) -> dict[str, str | None]:
        """What the model is, for response headers and /v1/model (folders by name, not full path)."""
        quant = Path(self.quant).name if self.quant else None
        return {"source": Path(self.source).name or self.source, "backend": self.backend, "version": self.version,
                "quant": quant}


@dataclass(frozen=True)
class ServeLimits:
    """Back-pressure and input limits of one server (one runtime)."""

    max_queue: int = 8  # edits waiting beyond the one running; one more gets 503 + Retry-After
    timeout_s: float = 300.0  # per request, queue wait included; past it: 504 and the edit is stopped
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16 * 1024 * 1024  # decoded input image; more is 413
    max_steps: int = 100
    max_size_level: int | None = None  # None: the model's largest profile level
    default_size_level: int | None = None  # None: the model's largest profile level (as `edit`)
    warmup: bool = True  # one small edit before /readyz says ready

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_upload_bytes", "max_pixels", "max_steps"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
