"""Which step cache and its threshold: a plain value `RuntimeOptions` holds (the policies are in `caching`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CachePolicy = Literal["teacache", "fbcache"]
# Upstream's default TeaCache threshold; 0.08 is ParaAttention's suggested First-Block Cache threshold for FLUX.
DEFAULT_THRESHOLDS: dict[str, float] = {"teacache": 0.2, "fbcache": 0.08}
@dataclass(frozen=True)
class CacheSpec:
    """Which step cache and its threshold; `parse("teacache:0.4")`, `parse("fbcache")`."""

    policy: CachePolicy
    threshold: float

    def __post_init__(self) -> None:
        if self.policy not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown step cache {self.policy!r}; choose one of {', '.join(DEFAULT_THRESHOLDS)}")
        if not self.threshold > 0:
            raise ValueError(f"step cache threshold must be > 0, got {self.threshold}")

    @classmethod
    def parse(cls, text: str) -> CacheSpec:
        name, _, value = text.partition(":")
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(f"cache {text!r}: expected teacache[:T] or fbcache[:T]")
        try:
            threshold = float(value) if value else DEFAULT_THRESHOLDS[name]
        except ValueError:
            raise ValueError(f"cache {text!r}: threshold {value!r} is not a number") from None
        return cls(name, threshold)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.policy}:{self.threshold:g}"
