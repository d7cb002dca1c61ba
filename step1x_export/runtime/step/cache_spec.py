"""Which step cache and its threshold: a plain value `RuntimeOptions` holds (the policies are in `caching`;
RegionE's, which also skips the tokens an edit leaves alone, in `region` / `region_step`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .region_spec import RegionParams

CachePolicy = Literal["teacache", "fbcache", "regione"]
# Upstream's default TeaCache threshold; 0.08 is ParaAttention's suggested First-Block Cache threshold for FLUX.
# RegionE's threshold is its similarity threshold (its other settings: `RegionParams`).
DEFAULT_THRESHOLDS: dict[str, float] = {"teacache": 0.2, "fbcache": 0.08, "regione": RegionParams().threshold}


@dataclass(frozen=True)
class CacheSpec:
    """Which step cache and its threshold; `parse("teacache:0.4")`, `parse("fbcache")`,
    `parse("regione:threshold=0.9,cache=0.03")`."""

    policy: CachePolicy
    threshold: float
    region: RegionParams | None = None  # RegionE's settings (policy regione only)

    def __post_init__(self) -> None:
        if self.policy not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown step cache {self.policy!r}; choose one of {', '.join(DEFAULT_THRESHOLDS)}")
        if self.policy == "regione":  # a similarity: any value (<= -1 edits nothing, >= 1 everything)
            if self.region is None:
                object.__setattr__(self, "region", RegionParams(threshold=self.threshold))
        elif not self.threshold > 0:
            raise ValueError(f"step cache threshold must be > 0, got {self.threshold}")

    @classmethod
    def parse(cls, text: str) -> CacheSpec:
        name, _, value = text.partition(":")
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(f"cache {text!r}: expected teacache[:T], fbcache[:T] or regione[:key=value,...]")
        if name == "regione":
            params = RegionParams.parse(value if "=" in value or not value else f"threshold={value}")
            return cls("regione", params.threshold, params)
        try:
            threshold = float(value) if value else DEFAULT_THRESHOLDS[name]
        except ValueError:
            raise ValueError(f"cache {text!r}: threshold {value!r} is not a number") from None
        return cls(name, threshold)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.region is not None:
            return f"{self.policy}:{self.region}".rstrip(":")
        return f"{self.policy}:{self.threshold:g}"
