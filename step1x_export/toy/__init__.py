"""A small Step1X-Edit (`toy` config) trained here to do real edits with exact targets; its weights ship
in `weights/` in the official layout and load through the same code as the published checkpoints
(`step1x_export.sources` resolves the name)."""

from __future__ import annotations

from ..sources import PACKAGED, small_pipeline, weights_note

__all__ = ["PACKAGED", "small_pipeline", "weights_note"]
