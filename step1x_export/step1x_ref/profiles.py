"""The edit resolutions each model is served at: the size-level range and aspect ratios an export covers
without re-export, and the default size level. Model data, so it sits with the configs (the pipeline and the
component specs both read it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import InputError
from .configs import ModelConfig
from .imaging import edit_size


@dataclass(frozen=True)
class Profile:
    """The edit resolutions an export must cover without re-export."""

    min_level: int
    opt_level: int
    max_level: int
    max_aspect: float  # long side / short side
    learned: bool = False  # the only levels the model learned: outside them it makes no edit, so they are refused

    def edit_sizes(self, level: int, samples: int = 257) -> list[tuple[int, int]]:
        """Every (width, height) the size_level rule gives at `level` for aspect ratios within max_aspect.

        Flooring to multiples of 16 makes token counts vary non-monotonically with the aspect ratio, so
        the extremes are found by a sweep, not from the two end ratios alone.
        """
        ratios = [self.max_aspect ** (2 * i / (samples - 1) - 1) for i in range(samples)]
        return sorted({edit_size(round(10_000 * r), 10_000, level) for r in ratios})

    def opt_size(self) -> tuple[int, int]:
        return edit_size(1, 1, self.opt_level)


FULL_PROFILE = Profile(min_level=512, opt_level=1024, max_level=1024, max_aspect=2.0)
TINY_PROFILE = Profile(min_level=32, opt_level=64, max_level=256, max_aspect=2.0)


# The trained toy model edits at the size levels and aspect ratios it trained at: 64 to 160, up to 2:1 both
# ways; by default at its top, where its held-out edits score best (at 128 a 3:2 photo is 144x96, a grid where
# its "swap red and blue" fails on the coffee photo: 8.2 dB, against 18.1 at 192x128).
# Outside them it makes no real edit, so other levels are refused (`check_size_level`).
TOY_PROFILE = Profile(min_level=64, opt_level=128, max_level=160, max_aspect=2.0, learned=True)


def profile_for(config: ModelConfig) -> Profile:
    if config.name in ("toy", "toy-v1.2"):  # the v1.2 toy is the toy fine-tuned at the same shapes
        return TOY_PROFILE
    return TINY_PROFILE if config.tiny_qwen is not None else FULL_PROFILE


def check_size_level(config: ModelConfig, size_level: int) -> None:
    """Refuse (InputError) a size level a model that learned only some cannot edit at; any other level runs."""
    profile = profile_for(config)
    if profile.learned and not profile.min_level <= size_level <= profile.max_level:
        raise InputError(f"size_level {size_level} is outside what the {config.name} model learned "
                         f"({profile.min_level}..{profile.max_level}), where it makes no real edit; leave it out "
                         f"for the model's default, {profile.max_level}")
