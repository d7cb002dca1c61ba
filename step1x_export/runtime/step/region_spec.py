"""RegionE's settings: a plain value `CacheSpec` holds (no torch: the CLI's --help reads it).

The defaults are the published ones for Step1X-Edit (v1.0 / v1.1 and v1.2 alike): 28 steps, 6 warm-up steps,
2 post steps, one refresh at step 16 (1-based), similarity threshold 0.88, velocity-cache threshold 0.02,
erosion and dilation of the edited mask on, the reference tokens' keys and values cached for the region steps.
Written `regione` or `regione:key=value,...`, e.g.
`regione:threshold=0.9,cache=0.03,refresh=12+20`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import pairwise

# RegionE's velocity decay constants were fitted for this many steps; it refuses any other count, and so do we.
REGION_STEPS = 28
_KEYS = {"threshold": float, "cache": float, "warmup": int, "post": int, "refresh": str, "erode": int, "ref_kv": int}


@dataclass(frozen=True)
class RegionParams:
    """RegionE's knobs. `refresh` are 1-based step numbers, as the published settings write them."""

    threshold: float = 0.88  # a token is edited where cos(predicted final latent, reference latent) <= this
    cache: float = 0.02  # reuse the edited tokens' velocity while 1 - (product of decay ratios) stays <= this
    warmup: int = 6  # full steps before the partition (the partition is made on the last of them)
    post: int = 2  # full steps at the end, after the unedited tokens rejoin (warmup + post = 28: no partition)
    refresh: tuple[int, ...] = (16,)  # full steps in between that renew the cached keys and values
    erode: bool = True  # remove isolated edited tokens (erode with a 3x3 cross, dilate with a 5x5 square)
    # The region steps attend to the reference tokens' keys and values cached at the last full step (published);
    # ref_kv=0 recomputes the reference tokens in every region call instead. With every token edited and no
    # reuse (threshold=2,erode=0,cache=0,ref_kv=0) every step then computes every token: the plain edit.
    ref_kv: bool = True

    def __post_init__(self) -> None:
        refresh = tuple(sorted(self.refresh))
        object.__setattr__(self, "refresh", refresh)
        last = REGION_STEPS - self.post - 1
        if self.warmup < 1 or self.post < 0 or self.warmup + self.post > REGION_STEPS:
            raise ValueError(f"regione: warmup must be >= 1 and warmup + post <= {REGION_STEPS}, "
                             f"got warmup={self.warmup} post={self.post}")
        if any(not self.warmup + 1 < r <= last for r in refresh):
            raise ValueError(f"regione: refresh steps must lie in ({self.warmup + 1}, {last}], got {refresh}")
        if any(b - a < 2 for a, b in pairwise(refresh)):
            raise ValueError(f"regione: refresh steps must not be adjacent or repeated, got {refresh}")
        if not self.cache >= 0:
            raise ValueError(f"regione: cache threshold must be >= 0, got {self.cache}")

    @classmethod
    def parse(cls, text: str) -> RegionParams:
        """`key=value` pairs separated by commas (refresh steps joined by '+'); '' gives the defaults."""
        values: dict[str, object] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in _KEYS:
                raise ValueError(f"regione: {item!r} is not key=value with key one of {', '.join(_KEYS)}")
            try:
                if key == "refresh":
                    values[key] = tuple(int(v) for v in value.split("+") if v)
                elif key in ("erode", "ref_kv"):
                    values[key] = bool(int(value))
                else:
                    values[key] = _KEYS[key](value)
            except ValueError:
                raise ValueError(f"regione: {key}={value!r} is not a valid {key}") from None
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        default = RegionParams()
        changed = [f for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]
        return ",".join(f"{f.name}={self._text(f.name)}" for f in changed)

    def _text(self, name: str) -> str:
        value = getattr(self, name)
        if name == "refresh":
            return "+".join(str(r) for r in value)
        return str(int(value)) if isinstance(value, bool) else f"{value:g}"
