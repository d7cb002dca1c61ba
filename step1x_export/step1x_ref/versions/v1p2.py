"""v1.2's edit around the shared denoising loop: its image preparation, its conditioning, the step function
over it, its output, and no text-to-image.

The two CFG branches have different text lengths (padding is trimmed) and the DiT's joint attention is
unmasked. As the published pipeline does, the step runs the DiT with batch 1 per branch and concatenates
(`text_bucket=0`: the exact-parity path). With a text bucket, both branches share one batch-2 call, their
texts padded to the bucket and the padding masked (`v1p2_joint`): the same function, rounded differently.
The loop (`sampling.denoise`) is unchanged; only its step function and conditioning differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...validate import InputError, check_finite
from ..configs import ModelConfig
from ..edit_inputs import EditImage
from ..imaging import check_size, edit_size, to_rgb
from ..mllm.conditioner import Qwen25VLEmbedder
from ..mllm.conditioner_v1p2 import Qwen25VLEmbedderV12, V12Text
from ..sampling import StepFn
from .v1p2_joint import joint_conditioning, masked_step, stack_joint
from .v1p2_positions import branch_inputs

# The DiT's inputs per branch besides img and timestep, in the dit spec's order.
BRANCH_INPUTS = ("pe", "llm_embedding", "llm_mask", "text_embeds", "text_mask")


def prepare_image_v1p2(image: Image.Image, size_level: int) -> tuple[Tensor, Image.Image, int, int, tuple[int, int]]:
    """(VAE input [1, 3, H, W] in [0, 1], the MLLM's image, width, height, input size), as v1.2's pipeline
    resizes: the VAE input by bilinear antialiased interpolation of the float image, the MLLM's image by
    Pillow's LANCZOS, both to the size_level edit size."""
    check_size(image)
    image = to_rgb(image)
    width, height = edit_size(*image.size, size_level)
    pixels = torch.from_numpy(np.asarray(image).copy()).float().permute(2, 0, 1)[None] / 255.0
    resized = torch.nn.functional.interpolate(pixels, (height, width), mode="bilinear", antialias=True)
    return resized, image.resize((width, height), Image.Resampling.LANCZOS), width, height, image.size


def postprocess_v1p2(pixels: Tensor, orig_size: tuple[int, int]) -> Image.Image:
    """Decoded pixels [1, 3, H, W] -> PIL at the input's size (rounded to uint8, then Pillow's default resize)."""
    x = (pixels[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((x * 255).round().astype(np.uint8)).resize(orig_size)


def with_rules(embedder: Qwen25VLEmbedder, config: ModelConfig) -> Qwen25VLEmbedder:
    """The embedder `config` needs: v1.2's (with its rules) over the same Qwen model, or `embedder` unchanged."""
    rules = config.reason_edit
    if rules is None or isinstance(embedder, Qwen25VLEmbedderV12):
        return embedder
    return Qwen25VLEmbedderV12(embedder.model, embedder.processor, config.embedder,
                               bang_is_padding=rules.bang_is_padding, bf16_embeddings=rules.bf16_embeddings)


def branch_conditioning(config: ModelConfig, texts: list[V12Text], width: int, height: int,
                        text_bucket: int = 0) -> tuple[Tensor, ...]:
    """The loop's explicit conditioning: the cond branch's DiT inputs, then the uncond branch's; with a
    `text_bucket`, both in one batch-2 set, texts padded to the bucket."""
    branches = [[branch_inputs(config, text, height // 16, width // 16)[name] for name in BRANCH_INPUTS]
                for text in texts]
    if text_bucket:
        return joint_conditioning(branches, text_bucket)
    return tuple(t for b in branches for t in b)


def per_branch(step_fn: StepFn, n_inputs: int = len(BRANCH_INPUTS)) -> StepFn:
    """A step over (img [2, ...], t [2], *cond inputs, *uncond inputs) from a batch-1 `step_fn(img, t, *inputs)`."""

    def step(img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        if len(conditioning) != 2 * n_inputs:
            raise ValueError(f"per-branch step: expected {2 * n_inputs} conditioning tensors, got {len(conditioning)}")
        cond, uncond = conditioning[:n_inputs], conditioning[n_inputs:]
        return torch.cat([step_fn(img[:1], t[:1], *cond), step_fn(img[1:], t[1:], *uncond)])

    return step


@dataclass(frozen=True)
class V1p2:
    """v1.2: reasoning edits. The CFG branches keep their own (trimmed) text lengths, so the DiT runs once per
    branch, or (`text_bucket` > 0) once for both, texts padded to a multiple of `text_bucket` tokens and masked;
    the image is resized for the VAE and the MLLM separately; there is no text-to-image."""

    config: ModelConfig = field(repr=False)
    text_to_image: bool = False
    shape_buckets: bool = False
    trimmed_text: bool = True
    # its text-token mapping reads the LLM's input embeddings, which the llm graph does not output
    reasoning: bool = True  # the MLLM thinks before the edit and judges it after (`mllm.reasoning`)
    dit_inputs: tuple[str, ...] = BRANCH_INPUTS  # per branch; `conditioning` holds the cond then the uncond
    mllm_graphs: bool = False
    text_bucket: int = 0  # 0: the DiT once per CFG branch (the published pipeline's calls); else one padded call

    @property
    def per_branch_dit(self) -> str:
        return "" if self.text_bucket else "v1.2 runs one DiT call per CFG branch at its own text length"

    def joint(self, text_bucket: int) -> V1p2:
        return replace(self, text_bucket=text_bucket)

    def stack(self, rows: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        if not self.text_bucket:
            raise ValueError("v1.2 edits share a DiT call only with both CFG branches in one call (a text bucket)")
        return stack_joint(rows)

    def embedder(self, embedder: Qwen25VLEmbedder) -> Qwen25VLEmbedder:
        return with_rules(embedder, self.config)

    def prepare(self, image: Image.Image | None, size_level: int, *, width: int | None = None,
                height: int | None = None, bucket: tuple[int, int] | None = None) -> EditImage:
        if image is None:
            raise InputError(f"{self.config.name}: text-to-image is not supported for v1.2")
        return EditImage(*prepare_image_v1p2(image, size_level))

    def check_encoded(self, encoded: list[V12Text]) -> None:
        for text in encoded:
            check_finite("the MLLM encoder (text embedding)", text.embedding)

    def conditioning(self, encoded: list[V12Text], img: EditImage) -> tuple[Tensor, ...]:
        return branch_conditioning(self.config, encoded, img.width, img.height, self.text_bucket)

    def step(self, step_fn: StepFn) -> StepFn:
        return masked_step(step_fn) if self.text_bucket else per_branch(step_fn)

    def postprocess(self, pixels: Tensor, orig_size: tuple[int, int]) -> Image.Image:
        return postprocess_v1p2(pixels, orig_size)
