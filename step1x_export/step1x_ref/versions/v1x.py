"""v1.0 and v1.1: the image resized by the config's filter (or to a shape bucket), both CFG branches padded
to one text length and run as one batch-2 DiT call, text-to-image from a blank canvas, bicubic output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ...validate import check_finite
from ..configs import ModelConfig, Resample
from ..edit_inputs import EditImage, t2i_canvas, text_positions
from ..imaging import RESAMPLE, check_size, edit_size, pil_to_tensor, tensor_to_pil, to_rgb
from ..mllm.conditioner import Qwen25VLEmbedder
from ..sampling import StepFn, stack_rows


def prepare_image(image: Image.Image, size_level: int, size: tuple[int, int] | None = None,
                  resample: Resample = "lanczos") -> EditImage:
    """Validate, convert to RGB and resize by the size_level rule (shared by every backend), or to `size`
    (width, height: a shape bucket) when given, with the config's filter."""
    check_size(image)
    image = to_rgb(image)
    width, height = size or edit_size(*image.size, size_level)
    resized = pil_to_tensor(image.resize((width, height), RESAMPLE[resample]))
    # Upstream hands the MLLM the resized image after a float round trip (to_pil truncates).
    return EditImage(resized, tensor_to_pil(resized[0]), width, height, image.size)


def prepare_input(image: Image.Image | None, size_level: int, config: ModelConfig,
                  width: int | None = None, height: int | None = None,
                  bucket: tuple[int, int] | None = None) -> EditImage:
    """The edit's image (resized with the config's filter), or the text-to-image canvas when there is none."""
    if image is None:
        if width is None or height is None:
            raise ValueError("text-to-image (no input image) needs width and height")
        return t2i_canvas(width, height)
    if width is not None or height is not None:
        raise ValueError("width/height choose a text-to-image size; an edit's size follows its image and size_level")
    return prepare_image(image, size_level, bucket, config.input_resample)


def postprocess(pixels: torch.Tensor, orig_size: tuple[int, int]) -> Image.Image:
    """Decoded pixels [1, 3, H, W] in about [-1, 1] -> PIL at the input's size."""
    out = tensor_to_pil(pixels[0].float().clamp(-1, 1).mul(0.5).add(0.5))
    return out.resize(orig_size, Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class V1x:
    """v1.0 / v1.1 (they differ in the reference tokens' position ids and the connector: both config data)."""

    config: ModelConfig = field(repr=False)
    text_to_image: bool = True
    shape_buckets: bool = True
    trimmed_text: bool = False
    reasoning: bool = False
    dit_inputs: tuple[str, ...] = ("pe", "llm_embedding", "llm_mask")  # one batch-2 call for both branches
    mllm_graphs: bool = True
    per_branch_dit: str = ""

    def joint(self, text_bucket: int) -> V1x:
        return self

    def stack(self, rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        return stack_rows(rows)

    def embedder(self, embedder: Qwen25VLEmbedder) -> Qwen25VLEmbedder:
        return embedder

    def prepare(self, image: Image.Image | None, size_level: int, *, width: int | None = None,
                height: int | None = None, bucket: tuple[int, int] | None = None) -> EditImage:
        return prepare_input(image, size_level, self.config, width, height, bucket)

    def check_encoded(self, encoded: tuple[torch.Tensor, torch.Tensor]) -> None:
        check_finite("the MLLM encoder (text embedding)", encoded[0])

    def conditioning(self, encoded: tuple[torch.Tensor, torch.Tensor], img: EditImage) -> tuple[torch.Tensor, ...]:
        """(pe, llm_embedding [2, L, C], llm_mask [2, L]): one padded text length for both branches."""
        pe = text_positions(self.config, encoded[0].shape[1], img.width, img.height, reference=img.has_reference)
        return (pe, *encoded)

    def step(self, step_fn: StepFn) -> StepFn:
        return step_fn

    def postprocess(self, pixels: torch.Tensor, orig_size: tuple[int, int]) -> Image.Image:
        return postprocess(pixels, orig_size)
