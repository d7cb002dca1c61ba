"""A small Step1X-Edit (`toy` config) trained here to do real edits with exact targets; its weights ship
in `weights/` in the official layout and load through the same code as the published checkpoints."""

from __future__ import annotations

import torch

from ..step1x_ref.configs import get_config
from ..step1x_ref.loading import CheckpointError
from ..step1x_ref.pipeline import Step1XEditPipeline
from .weights import WEIGHTS_DIR

# Small configs whose trained weights ship inside the package; the other small ones get seeded random weights.
PACKAGED = {"toy": WEIGHTS_DIR}


def small_pipeline(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Step1XEditPipeline:
    """A small model by config name: its shipped trained weights if the package has them, else random ones."""
    if name not in PACKAGED:
        return Step1XEditPipeline.random(name, seed=seed, dtype=dtype)
    if not PACKAGED[name].is_dir():
        raise CheckpointError(f"the {name} weights are missing from {PACKAGED[name]}: "
                              "train them with `python -m step1x_export.toy.train`")
    return Step1XEditPipeline.from_pretrained(PACKAGED[name], config=get_config(name), dtype=dtype, device=str(device))


def weights_note(name: str, seed: int) -> str:
    if name in PACKAGED:
        return f"{name}: trained weights shipped in the package"
    return f"{name}: random weights (seed {seed})"
