"""What a server loads and the limits it enforces: plain data, so a Ray replica can be handed them by pickle."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime.options import BACKENDS
from ..validate import MAX_PIXELS

if TYPE_CHECKING:
    from ..runtime import Step1XEditRuntime

@dataclass(frozen=True)
class RuntimeSpec:
    """How to build the `Step1XEditRuntime` that serves edits: `Step1XEditRuntime.load(source, backend, **options)`.

    `source` is a tiny config name, a model dir (torch) or an export / engine dir; `options` are `load`'s
    keywords (quant, device, dtype, compile, cuda_graphs, version, mllm, ...), as the runtime CLI flags give them.
    """

    source: str
    backend: str = "torch"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")

    @classmethod
    def from_load_kwargs(cls, kwargs: dict[str, Any]) -> RuntimeSpec:
        rest = {k: v for k, v in kwargs.items() if k not in ("source", "backend")}
        return cls(str(kwargs["source"]), kwargs.get("backend", "torch"), rest)

    def load(self) -> Step1XEditRuntime:
        """The runtime; `max_batch` None (the server's default: batch where the runtime can) is not passed."""
        from ..runtime import Step1XEditRuntime

        options = {k: v for k, v in self.options.items() if not (k == "max_batch" and v is None)}
        return Step1XEditRuntime.load(self.source, self.backend, **options)  # type: ignore[arg-type]

    def identity(self) -> dict[str, str | None]:
        """What the model is, for response headers and /v1/model (folders by name, not full path)."""
        quant = self.options.get("quant")
        return {"source": Path(self.source).name or self.source, "backend": self.backend,
                "version": self.options.get("version", "v1.1"), "quant": Path(quant).name if quant else None}


@dataclass(frozen=True)
class ServeLimits:
    """Back-pressure and input limits of one server (one runtime)."""

    max_queue: int = 64  # edits waiting to join the batch; one more gets 503 + Retry-After (bounds their memory)
    timeout_s: float = 300.0  # per request, queue wait included; past it: 504 and the edit is stopped
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS  # decoded input image; more is 413 (the command line's and the API's limit)
    max_steps: int = 100
    max_size_level: int | None = None  # None: the model's largest profile level
    default_size_level: int | None = None  # None: the model's largest profile level (as `edit`)
    warmup: bool = True  # one small edit (and one batch) before /readyz says ready
    refuse_late: bool = True  # 503 at once for a request predicted to finish past its deadline (else: 504 then)
    adaptive_batch: bool = True  # batches of the measured size (<= max_batch) with the most steps per second

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_upload_bytes", "max_pixels", "max_steps"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
