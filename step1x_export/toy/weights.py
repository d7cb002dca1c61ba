"""Where the toy model's trained weights ship, and how it is run by default."""

from __future__ import annotations

from ..sources import PACKAGED
from ..step1x_ref.configs import get_config
from ..step1x_ref.profiles import TOY_PROFILE

# The official layout (DiT + connector, vae.safetensors, Qwen2.5-VL folder), inside the package.
WEIGHTS_DIR = PACKAGED["toy"]
FIGURES_FILE = "figures.json"  # what the training run measured on the held-out photos
TOY_SIZE = TOY_PROFILE.max_level  # the size level it edits at by default (it trained at 64 to 160)
TOY_STEPS = 28
TOY_CFG = get_config("toy").default_cfg  # the guidance it is run with (measured best for it)
