"""What every version's edit shares: the edit's image as the stages receive it, the noise, the schedule, the
inputs the denoising loop takes, and text-to-image's blank canvas and negative prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .configs import ModelConfig
from .dit.math import rope_table
from .sampling import StepFn, get_schedule, pack, position_ids


@dataclass
class EditInputs:
    """What the denoising loop needs, prepared once per edit (shared by every backend)."""

    noise: torch.Tensor  # [1, N, 64] packed, float32
    ref: torch.Tensor  # [1, N, 64] packed reference latent, float32 ([1, 0, 64] for text-to-image)
    llm_embedding: torch.Tensor  # [2, L, C] (cond, uncond); v1.2: the cond branch's [1, L, C]
    llm_mask: torch.Tensor  # [2, L]
    pe: torch.Tensor  # [1, 1, L + 2N, D/2, 2, 2]
    timesteps: list[float]
    width: int  # edit resolution (multiples of 16)
    height: int
    orig_size: tuple[int, int]
    # The DiT's inputs besides img and timestep, in the dit spec's order, as the version's step takes them
    # (v1.2: both CFG branches' own, since their text lengths differ; the fields above then hold the cond branch's).
    conditioning: tuple[torch.Tensor, ...] = ()
    # The version's step over that conditioning from a DiT step (v1.2: the DiT once per CFG branch).
    step_over: Callable[[StepFn], StepFn] = lambda step_fn: step_fn


@dataclass
class EditImage:
    """The input image at the edit resolution, as the VAE and the MLLM receive it (text-to-image: no
    reference image, `resized` is None and the MLLM sees a blank canvas)."""

    resized: torch.Tensor | None  # [1, 3, H, W] in [0, 1]
    mllm_image: Image.Image
    width: int
    height: int
    orig_size: tuple[int, int]

    @property
    def has_reference(self) -> bool:
        return self.resized is not None


# Text-to-image, as upstream's inference.py runs it: the MLLM reads a black 1024x1024 image, and the CLI's
# unconditional branch gets this negative prompt (an edit's gets "").
T2I_MLLM_SIZE = (1024, 1024)
T2I_NEGATIVE_PROMPT = (
    "worst quality, wrong limbs, unreasonable limbs, normal quality, low quality, low res, blurry, text, "
    "watermark, logo, banner, extra digits, cropped, jpeg artifacts, signature, username, error, sketch ,"
    "duplicate, ugly, monochrome, horror, geometry, mutation, disgusting"
)


def t2i_canvas(width: int, height: int) -> EditImage:
    """Text-to-image at width x height (multiples of 16): no reference, a blank image for the MLLM."""
    for name, side in (("width", width), ("height", height)):
        if side < 16 or side % 16:
            raise ValueError(f"text-to-image {name} must be a multiple of 16 and >= 16, got {side}")
    return EditImage(None, Image.new("RGB", T2I_MLLM_SIZE), width, height, (width, height))


def no_reference(config: ModelConfig, device: torch.device | str) -> torch.Tensor:
    """The reference tokens of a text-to-image run: none ([1, 0, 64]); the loop's concat then adds nothing."""
    return torch.zeros(1, 0, config.dit.in_channels, device=device)


def negative_prompt_for(img: EditImage, negative_prompt: str | None) -> str:
    """The unconditional branch's prompt: as given, else upstream's default for the task."""
    if negative_prompt is not None:
        return negative_prompt
    return "" if img.has_reference else T2I_NEGATIVE_PROMPT


def make_noise(width: int, height: int, seed: int) -> torch.Tensor:
    """Seeded N(0, 1) latent noise [1, 16, H/8, W/8] from a CPU generator (device-independent)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, height // 8, width // 8, generator=gen, dtype=torch.float32)


def noise_and_schedule(width: int, height: int, *, seed: int, steps: int) -> tuple[torch.Tensor, list[float]]:
    """(packed noise [1, N, 64], timesteps) of one edit, on CPU."""
    return pack(make_noise(width, height, seed)), get_schedule(steps, (height // 16) * (width // 16))


def text_positions(config: ModelConfig, txt_len: int, width: int, height: int, *,
                   reference: bool = True) -> torch.Tensor:
    """The RoPE table pe of padded text (all-zero ids) before the noisy and reference tokens (v1.0 / v1.1)."""
    ids = position_ids(txt_len, height // 16, width // 16, config.version, reference=reference)
    return rope_table(ids, config.dit.axes_dim, config.dit.theta)


def sampling_inputs(
    config: ModelConfig, txt_len: int, width: int, height: int, *, seed: int, steps: int, reference: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(packed noise [1, N, 64], RoPE table pe, timesteps) of one edit (or, without reference, one
    text-to-image generation), on CPU."""
    noise, timesteps = noise_and_schedule(width, height, seed=seed, steps=steps)
    return noise, text_positions(config, txt_len, width, height, reference=reference), timesteps
