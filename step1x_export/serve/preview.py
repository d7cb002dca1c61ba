"""Cheap live previews: a linear map from the DiT's latent channels to RGB, one small matrix per VAE.

Decoding a half-denoised latent with the VAE would cost as much as the edit's final decode at every step;
a 16 -> 3 linear map per latent pixel costs nothing and shows where the picture is going (at 1/8 of its size).
The map of the toy model's VAE is data (`preview_toy.json`), fitted once by `fit_projection`
(`benchmarks/fit_preview.py`): least squares from the final latents of edits to their decoded pixels,
averaged over each latent pixel's 8x8 block. Models
without a fitted map send no previews (their progress events still carry the step and the ETA).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from ..runtime import Step1XEditRuntime

LATENT_STRIDE = 8  # image pixels per latent pixel along each side (the FLUX VAE's downsampling)
# Model config -> its fitted map, beside this module (the v1.2 toy decodes with the toy's autoencoder).
FITTED = {"toy": "preview_toy.json", "toy-v1.2": "preview_toy.json"}


@dataclass(frozen=True)
class Projection:
    """rgb = latent @ weight + bias per latent pixel, rgb in [0, 1]; `fit` says how it was made."""

    weight: np.ndarray  # [C, 3]
    bias: np.ndarray  # [3]
    fit: str

    @classmethod
    def for_model(cls, config: str) -> Projection | None:
        name = FITTED.get(config)
        if name is None:
            return None
        data = json.loads(files(__package__).joinpath(name).read_text(encoding="utf-8"))
        return cls(np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32), data["fit"])

    def to_json(self) -> str:
        rows = ",\n  ".join(json.dumps(row) for row in np.round(self.weight.astype(np.float64), 6).tolist())
        bias = json.dumps(np.round(self.bias.astype(np.float64), 6).tolist())
        return f'{{"fit": {json.dumps(self.fit)}, "weight": [{rows}], "bias": {bias}}}\n'

    def rgb(self, latent: np.ndarray) -> np.ndarray:
        """[C, h, w] latent -> [h, w, 3] uint8."""
        pixels = np.einsum("chw,cr->hwr", latent, self.weight) + self.bias
        return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)

    def png(self, tokens: torch.Tensor, width: int, height: int) -> bytes:
        """The preview PNG ((width / 8) x (height / 8)) of an edit's tokens [1, N, 64] at its edit size."""
        from PIL import Image

        from ..step1x_ref.sampling import unpack

        latent = unpack(tokens.detach().float().cpu(), height, width)[0].numpy()
        buf = io.BytesIO()
        Image.fromarray(self.rgb(latent)).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def block_mean(image: np.ndarray, stride: int = LATENT_STRIDE) -> np.ndarray:
    """[H, W, 3] -> [H / stride, W / stride, 3]: each latent pixel's block of image pixels, averaged."""
    h, w = image.shape[0] // stride, image.shape[1] // stride
    return image[: h * stride, : w * stride].reshape(h, stride, w, stride, -1).mean(axis=(1, 3))


def fit_projection(runtime: Step1XEditRuntime, photos: list[np.ndarray], instructions: list[str], *,
                   size: int = 160, steps: int | None = None) -> Projection:
    """Least squares from the final latents of `runtime`'s edits (each photo, centre-cropped to `size`^2, with
    each instruction) to their decoded pixels averaged over 8x8 blocks: an input at its edit size is returned
    unresized, so the output's blocks are exactly the latent's pixels."""
    from PIL import Image

    from ..step1x_ref.sampling import unpack

    xs, ys = [], []
    for photo in photos:
        image = Image.fromarray(photo).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        for k, instruction in enumerate(instructions):
            out = runtime.edit(image, instruction, seed=k, steps=steps, size_level=size)
            if out.size != (size, size):
                raise ValueError(f"the edit came back at {out.size}, not its edit size {size}x{size}")
            latent = unpack(runtime.last_latent.float().cpu(), size, size)[0].numpy()  # [C, h, w]
            xs.append(latent.reshape(latent.shape[0], -1).T)
            ys.append(block_mean(np.asarray(out, np.float32) / 255).reshape(-1, 3))
    x, y = np.concatenate(xs), np.concatenate(ys)
    design = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = float(np.sqrt(np.mean((design @ solution - y) ** 2)))
    fit = (f"least squares over {len(x)} latent pixels of {len(xs)} edits ({len(photos)} photos x "
           f"{len(instructions)} instructions, {size}^2) of {runtime.config.name}; RMS error {residual:.4f} "
           "of full scale")
    return Projection(solution[:-1].astype(np.float32), solution[-1].astype(np.float32), fit)
