"""What differs between model versions: one module per release behind `base.EditVersion`, chosen from the
config by `edit_version`. A new release is a module here, its config, and one line in `VERSIONS`."""

from __future__ import annotations

from collections.abc import Callable

from ..configs import ModelConfig, Version
from .base import EditVersion
from .v1p2 import V1p2
from .v1x import V1x

VERSIONS: dict[Version, Callable[[ModelConfig], EditVersion]] = {"v1.0": V1x, "v1.1": V1x, "v1.2": V1p2}


def edit_version(config: ModelConfig) -> EditVersion:
    """The rules of `config`'s release."""
    return VERSIONS[config.version](config)


__all__ = ["VERSIONS", "EditVersion", "edit_version"]
