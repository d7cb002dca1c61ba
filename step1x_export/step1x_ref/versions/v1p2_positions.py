"""v1.2's RoPE position ids: text tokens from Qwen's mRoPE, image tokens of the MLLM placed on the latent
grid, reference latents at (1, r, c).

All in float32 and in the published pipeline's order of operations (its affine matrices, their float32
inverse), so the ids match it to float32 rounding (the last bit follows the CPU's LAPACK kernel, there as
here), and the float64 RoPE table built from them does too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..configs import ModelConfig
from ..dit.math import rope_table
from ..mllm.conditioner_v1p2 import V12Text
from ..sampling import image_ids

VISION_PIXELS = 28  # pixels per merged vision token side (2 x 14-pixel patches)
VISION_CENTRE = 13.5  # a merged vision token's centre, in pixels from its corner
LATENT_PIXELS = 16  # pixels per packed latent token side (VAE 8x, then 2x2 packing)
VAE_CENTRE = 11  # the centre of a latent token's receptive field in the VAE encoder, in pixels


def text_ids(rope_positions: Tensor) -> Tensor:
    """[L, 3] ids: (T - (max T + 1), 0, 0) with T Qwen's mRoPE temporal index, so the last token is -1."""
    ids = rope_positions.float().clone()
    ids -= ids[:, 0].max() + 1
    ids[:, 1:] = 0
    return ids


def _affine(scale_x: Tensor | float, scale_y: Tensor | float, shift: float) -> Tensor:
    mat = torch.eye(3)
    mat[0, 0], mat[1, 1] = scale_x, scale_y
    mat[0, 2] = mat[1, 2] = shift
    return mat


def vision_to_latent(grid: tuple[int, int], source_size: tuple[int, int]) -> Tensor:
    """(y, x) on the latent token grid [rows * cols, 2] of each merged vision token (row-major).

    A token's column c is its centre 28c + 13.5 in the processor's resized image (W_res = 28 cols),
    scaled to the source image (W_src) by (W_src - 1)/(W_res - 1), then to latent tokens by (x - 11)/16.
    """
    rows, cols = grid
    src_w, src_h = source_size
    resize = _affine(torch.tensor(cols * VISION_PIXELS - 1) / (src_w - 1),
                     torch.tensor(rows * VISION_PIXELS - 1) / (src_h - 1), 0.0)
    vision = _affine(1 / VISION_PIXELS, 1 / VISION_PIXELS, -VISION_CENTRE / VISION_PIXELS)
    latent = _affine(1 / LATENT_PIXELS, 1 / LATENT_PIXELS, -VAE_CENTRE / LATENT_PIXELS)
    mat = latent @ torch.linalg.inv(vision @ resize)
    yy, xx = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                            indexing="ij")
    xy = torch.stack([xx, yy], dim=-1).reshape(-1, 2) @ mat[:2, :2].T + mat[:2, 2][None]
    return xy[:, [1, 0]]


def branch_ids(text: V12Text, h_tokens: int, w_tokens: int) -> Tensor:
    """[1, L + 2N, 3]: text ids (image tokens moved onto the latent grid), noisy (0, r, c), reference (1, r, c)."""
    txt = text_ids(text.rope_positions.cpu())
    vision = text.vision_mask.cpu()
    if vision.any():
        grid = vision_to_latent(text.vision_grid, text.image_size)
        txt[vision, 1:] = grid[: int(vision.sum())]
    noisy = image_ids(h_tokens, w_tokens)
    ref = image_ids(h_tokens, w_tokens, index=1.0)
    return torch.cat([txt, noisy, ref]).unsqueeze(0)


def branch_inputs(config: ModelConfig, text: V12Text, h_tokens: int, w_tokens: int) -> dict[str, Tensor]:
    """One CFG branch's DiT inputs besides img and timestep, keyed by the dit spec's names."""
    pe = rope_table(branch_ids(text, h_tokens, w_tokens), config.dit.axes_dim, config.dit.theta)
    length = text.embedding.shape[1]
    return {
        "pe": pe.to(text.embedding.device),
        "llm_embedding": text.embedding,
        "llm_mask": torch.ones(1, length, dtype=torch.long, device=text.embedding.device),
        "text_embeds": text.text_embeds,
        "text_mask": text.text_mask,
    }
