"""The I/O spec's profile covers every edit size the size_level rule produces within its aspect range."""

from __future__ import annotations

import pytest

from step1x_export.specs import dim_ranges, profile_for
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.imaging import edit_size


@pytest.mark.parametrize("name", ["tiny", "v1.1"])
def test_profile_covers_all_aspects_and_levels(name: str) -> None:
    config = get_config(name)
    profile, ranges = profile_for(config), dim_ranges(config)
    # photo-like sizes (incl. 451x300, whose 1.5 aspect floors to more tokens than the extremes at 256)
    shapes = [(451, 300), (300, 451), (640, 427), (1000, 1000), (1920, 1080), (1080, 1920), (2000, 1000)]
    for level in range(profile.min_level, profile.max_level + 1, 16):
        for w, h in shapes:
            ew, eh = edit_size(w, h, level)
            n = (ew // 16) * (eh // 16)
            lo, _, hi = ranges["img_tokens"]
            assert lo <= 2 * n <= hi, (w, h, level, 2 * n, ranges["img_tokens"])
            assert ranges["height"][0] <= eh <= ranges["height"][2] and ranges["width"][0] <= ew <= ranges["width"][2]
            assert ranges["seq_len"][0] <= config.embedder.max_length + 2 * n <= ranges["seq_len"][2]
