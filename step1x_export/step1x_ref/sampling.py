"""Sampler: shifted schedule, packing, position ids, true CFG with norm rescale, Euler denoising.

`denoise` is the one loop every backend runs: it takes any callable `step_fn(img, t) -> pred`
(a torch module, an ONNX Runtime session, a TensorRT engine) and never branches on backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from einops import rearrange
from torch import Tensor

from .configs import Version

# step_fn(img [2, 2N, 64] = (noisy | reference) x (cond, uncond), t [2]) -> pred [2, 2N, 64]
StepFn = Callable[[Tensor, Tensor], Tensor]
ProgressFn = Callable[[int, int], None]


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def schedule_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu is linear in the image sequence length through (256, base_shift) and (4096, max_shift)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + (base_shift - slope * 256)


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 timesteps from 1 to 0, shifted towards 1 for larger images."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1)
    return time_shift(schedule_mu(image_seq_len), 1.0, t).tolist()


def pack(latent: Tensor) -> Tensor:
    """[B, 16, H/8, W/8] -> [B, (H/16)(W/16), 64] (2x2 patches)."""
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for an image of height x width pixels."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 16, w=width // 16, ph=2, pw=2)


def image_ids(h_tokens: int, w_tokens: int, *, index: float = 0.0, offset: float = 0.0) -> Tensor:
    """Position ids (index, row + offset, col + offset) of a grid of image tokens: [h*w, 3]."""
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h_tokens)[:, None] + offset
    ids[..., 2] = torch.arange(w_tokens)[None, :] + offset
    return ids.reshape(h_tokens * w_tokens, 3)


def position_ids(txt_len: int, h_tokens: int, w_tokens: int, version: Version) -> Tensor:
    """[1, txt_len + 2N, 3]: text all zero, noisy (0, r, c), reference v1.0 (0, r, c), v1.1 (1, r+1, c+1)."""
    noisy = image_ids(h_tokens, w_tokens)
    ref = noisy.clone() if version == "v1.0" else image_ids(h_tokens, w_tokens, index=1.0, offset=1.0)
    return torch.cat([torch.zeros(txt_len, 3), noisy, ref]).unsqueeze(0)


def cfg_norm_factor(diff_norm: Tensor) -> Tensor:
    """f(n) = n**0.4 where n > 1, else 1: damps large cond-uncond differences."""
    return torch.where(diff_norm > 1.0, diff_norm.pow(0.4), torch.ones_like(diff_norm))


def cfg_combine(cond: Tensor, uncond: Tensor, guidance: float, rescale: bool) -> Tensor:
    """True CFG: uncond + w (cond - uncond), the difference divided by f(||.||) over channels if rescale."""
    diff = cond - uncond
    if rescale:
        diff = diff / cfg_norm_factor(torch.norm(diff, dim=2, keepdim=True))
    return uncond + guidance * diff


def denoise(
    step_fn: StepFn,
    x: Tensor,
    ref: Tensor,
    timesteps: list[float],
    *,
    guidance: float,
    truncate: float,
    progress: ProgressFn | None = None,
) -> Tensor:
    """Euler integration of the noisy tokens x [1, N, 64]; the reference tokens ref [1, N, 64] stay fixed."""
    n = x.shape[1]
    for i, (t_curr, t_prev) in enumerate(pairwise(timesteps)):
        img = torch.cat([x, ref], dim=1).expand(2, -1, -1)
        t = torch.full((2,), t_curr, dtype=x.dtype, device=x.device)
        pred = step_fn(img, t)
        pred = cfg_combine(pred[:1], pred[1:], guidance, rescale=t_curr > truncate)
        x = x + (t_prev - t_curr) * pred[:, :n]
        if progress is not None:
            progress(i + 1, len(timesteps) - 1)
    return x
