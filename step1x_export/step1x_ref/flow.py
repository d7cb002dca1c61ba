"""One edit, in order: prepare -> encode -> reference -> denoise -> decode -> postprocess, over stage engines.

`EditFlow` owns that order and the model's defaults; its version object (`versions.edit_version`) owns what
differs between releases. The reference pipeline runs it over eager torch modules
(`pipeline.EagerStages`); the runtime runs the same steps over its engines (compiled, graphed, ONNX Runtime,
TensorRT): `prepare_inputs` into a lane, its own loop (lanes of several edits share each DiT call), `finish`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from PIL import Image

from ..timing import StageTimer
from ..validate import check_edit_numbers, check_finite
from .configs import ModelConfig
from .edit_inputs import EditImage, EditInputs, negative_prompt_for, no_reference, noise_and_schedule
from .profiles import check_size_level, profile_for
from .sampling import ProgressFn
from .versions import EditVersion, edit_version


class PrepareStages(Protocol):
    """The engines before the loop; each call times itself on the edit's timer."""

    def encode_text(self, texts: list[str], image: Image.Image) -> Any:
        """The MLLM over [instruction, negative prompt] and the image: the version's encoder output."""
        ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE encoder: pixels [1, 3, H, W] in [-1, 1] -> packed reference tokens [1, N, 64] float32."""
        ...


class DecodeStage(Protocol):
    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """VAE decoder: tokens [1, N, 64] -> pixels [1, 3, H, W]."""
        ...


class EditStages(PrepareStages, DecodeStage, Protocol):
    """The engines of one whole edit (the runtime's lanes run the loop themselves, batched)."""

    def denoise(self, inputs: EditInputs, *, guidance: float, truncate: float,
                progress: ProgressFn | None) -> torch.Tensor:
        """The denoising loop over the version's step: the final tokens [1, N, 64]."""
        ...


class EditFlow:
    """The order of an edit and the model's defaults, for `config`'s version."""

    def __init__(self, config: ModelConfig, version: EditVersion | None = None):
        self.config = config
        self.version: EditVersion = version or edit_version(config)

    @property
    def default_size_level(self) -> int:
        """The model's edit resolution: 1024 for the real model (upstream's), its profile's top for a small one."""
        return profile_for(self.config).max_level

    def settle(self, *, seed: int, steps: int | None, cfg: float | None,
               size_level: int | None) -> tuple[int, float, int]:
        """(steps, cfg, size_level): the model's defaults where None, then checked (InputError naming one)."""
        steps = self.config.default_steps if steps is None else steps
        cfg = self.config.default_cfg if cfg is None else cfg
        size_level = self.default_size_level if size_level is None else size_level
        check_edit_numbers(steps=steps, cfg=cfg, size_level=size_level, seed=seed)
        check_size_level(self.config, size_level)
        return steps, cfg, size_level

    def prepare_inputs(
        self, stages: PrepareStages, timer: StageTimer, image: Image.Image | None, instruction: str, *, seed: int,
        steps: int, size_level: int, device: torch.device, negative_prompt: str | None = None,
        width: int | None = None, height: int | None = None, bucket: tuple[int, int] | None = None,
        check: Callable[[EditImage], None] | None = None,
    ) -> tuple[EditImage, EditInputs]:
        """Everything before the denoising loop: prepare (then `check` the size, before any model work), encode
        [instruction, negative prompt], the reference latent, the noise, the schedule and the conditioning."""
        with timer.stage("preprocess"):
            img = self.version.prepare(image, size_level, width=width, height=height, bucket=bucket)
            if check is not None:
                check(img)
        encoded = stages.encode_text([instruction, negative_prompt_for(img, negative_prompt)], img.mllm_image)
        self.version.check_encoded(encoded)
        if img.resized is None:
            ref = no_reference(self.config, device)
        else:
            ref = stages.encode_image(img.resized.to(device) * 2 - 1)
            check_finite("the VAE encoder (reference latent)", ref)
        noise, timesteps = noise_and_schedule(img.width, img.height, seed=seed, steps=steps)
        conditioning = tuple(c.to(device) for c in self.version.conditioning(encoded, img))
        pe, emb, mask = conditioning[:3]
        inputs = EditInputs(noise=noise.to(device), ref=ref, llm_embedding=emb, llm_mask=mask, pe=pe,
                            timesteps=timesteps, width=img.width, height=img.height, orig_size=img.orig_size,
                            conditioning=conditioning, step_over=self.version.step)
        return img, inputs

    def finish(self, stages: DecodeStage, timer: StageTimer, tokens: torch.Tensor, height: int, width: int,
               orig_size: tuple[int, int]) -> Image.Image:
        """Decode the final tokens and postprocess: the output image at the input's size."""
        check_finite("denoising (final latent)", tokens)
        pixels = stages.decode(tokens.float(), height, width)
        check_finite("the VAE decoder (image)", pixels)
        return self.postprocess(timer, pixels, orig_size)

    def postprocess(self, timer: StageTimer, pixels: torch.Tensor, orig_size: tuple[int, int]) -> Image.Image:
        with timer.stage("postprocess"):
            return self.version.postprocess(pixels, orig_size)

    def run(
        self, stages: EditStages, timer: StageTimer, image: Image.Image | None, instruction: str, *,
        device: torch.device, seed: int = 0, steps: int | None = None, cfg: float | None = None,
        size_level: int | None = None, negative_prompt: str | None = None, progress: ProgressFn | None = None,
        width: int | None = None, height: int | None = None,
    ) -> Image.Image:
        """One whole edit: the model's defaults, prepare -> encode -> reference -> denoise -> decode ->
        postprocess."""
        steps, cfg, size_level = self.settle(seed=seed, steps=steps, cfg=cfg, size_level=size_level)
        _, inputs = self.prepare_inputs(stages, timer, image, instruction, seed=seed, steps=steps,
                                        size_level=size_level, device=device, negative_prompt=negative_prompt,
                                        width=width, height=height)
        tokens = stages.denoise(inputs, guidance=cfg, truncate=self.config.cfg_truncate, progress=progress)
        return self.finish(stages, timer, tokens, inputs.height, inputs.width, inputs.orig_size)
