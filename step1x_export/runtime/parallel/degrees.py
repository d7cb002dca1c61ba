"""How one edit is split across ranks: a plain value (no torch), held by `RuntimeOptions`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDegrees:
    """How one edit is split: CFG branches (1 or 2), Ulysses (attention heads) and ring (sequence chunks)."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg_degree must be 1 or 2 (cond and uncond), got {self.cfg}")
        for name, value in (("ulysses_degree", self.ulysses), ("ring_degree", self.ring)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """Ranks that split one CFG branch's token sequence."""
        return self.ulysses * self.ring

    def __str__(self) -> str:
        degrees = (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring))
        split = [f"{name} {d}" for name, d in degrees if d > 1]
        return " x ".join(split) or "one process"

    def check_model(self, num_heads: int) -> None:
        if num_heads % self.ulysses:
            ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(f"ulysses_degree {self.ulysses} does not divide the DiT's {num_heads} attention heads; "
                             f"use one of {ok}")

    def check_tokens(self, txt_len: int, img_tokens: int) -> None:
        """Image tokens split evenly; text tokens too under ring attention (Ulysses alone takes uneven chunks)."""
        for what, n in (("text tokens", txt_len), ("image tokens (noisy + reference)", img_tokens)):
            if n % self.sequence and (what != "text tokens" or self.ring > 1):
                raise ValueError(f"ulysses_degree x ring_degree = {self.sequence} must divide the {n} {what}; "
                                 "choose another size_level or degree")
