"""Step caching measured by its pieces: the time of each piece of a DiT call (the head: connector, embeddings
and the cache's probe; the blocks; the final layer; the step's one device-to-host read of the decision) and the
speedup they project for a pattern of computed (C) and reused (.) steps.

Quality of a cache needs the real weights (on random ones the decisions and the PSNR say nothing about the
product); the pieces' times do not, and with upstream's rule's decision patterns they give the speedup a GPU
would see. A computed step runs head + blocks + final layer + the read; a reused one skips the blocks; no cache
runs head + blocks + final layer without the read.
"""

from __future__ import annotations

from typing import Any

import torch

from ..runtime.step.split_dit import LocalDiT
from ..step1x_ref.dit.model import Step1XEdit
from .measure import measure
from .models import DiTInputs

# Decisions upstream's TeaCache rule makes over 10 steps at its usual thresholds (first and last always computed).
PATTERNS = ("C.C.C.C.CC", "C..C..C..C", "C.....C..C")


def piece_ms(model: Step1XEdit, x: DiTInputs, dtype: torch.dtype, runs: int = 5) -> dict[str, float]:
    """Median ms of each piece of one CFG-batch DiT call on `x` (eager, the DiT's own modules)."""
    dit, device = LocalDiT(model), x.img.device
    args = (x.img.to(dtype), x.pe, x.t.to(dtype), x.llm_embedding.to(dtype), x.llm_mask)
    time = lambda name, fn: measure(name, fn, device=device, runs=runs).median_ms  # noqa: E731
    with torch.inference_mode():
        h = dit.prepare(*args)
        img = dit.rest(h, 0)
        flag = torch.ones((), dtype=torch.bool, device=device)
        return {"head_ms": time("head", lambda: dit.prepare(*args)),
                "blocks_ms": time("blocks", lambda: dit.rest(h, 0)),
                "finish_ms": time("finish", lambda: dit.finish(img, h.vec)),
                "sync_ms": time("sync", lambda: bool(flag.item())),
                "full_ms": time("full", lambda: model(*args))}


def projected_speedup(pattern: str, pieces: dict[str, float]) -> float:
    """No-cache time over cached time for a step pattern of C (computed) and . (reused)."""
    if set(pattern) - {"C", "."}:
        raise ValueError(f"a step pattern is C (computed) and . (reused), got {pattern!r}")
    step = pieces["head_ms"] + pieces["finish_ms"] + pieces["sync_ms"]
    cached = sum(step + (pieces["blocks_ms"] if c == "C" else 0.0) for c in pattern)
    return len(pattern) * pieces["full_ms"] / cached


def caching_projection(model: Step1XEdit, x: DiTInputs, dtype: torch.dtype, runs: int = 5) -> dict[str, Any]:
    pieces = piece_ms(model, x, dtype, runs)
    return {**pieces, "projected_speedup": {p: projected_speedup(p, pieces) for p in PATTERNS}}
