"""A DiT with the real widths but one double block, one single block and no refiner blocks (1.2 GB in bf16):
key names and layer sizes of the real checkpoint at a tenth of its size, for host-memory tests."""

from __future__ import annotations

from dataclasses import replace

from step1x_export.step1x_ref.configs import ModelConfig, get_config


def wide_config() -> ModelConfig:
    c = get_config("v1.1")
    return replace(c, name="wide", dit=replace(c.dit, depth=1, depth_single_blocks=1),
                   connector=replace(c.connector, depth=0))
