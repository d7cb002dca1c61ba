"""Sampler: shifted schedule, packing, position ids, true CFG with norm rescale, Euler denoising.

`denoise` is the one loop every backend runs. A backend gives a `step_fn(img, t, *conditioning) -> pred`
(a torch module, an ONNX Runtime session, a TensorRT engine); `guided_euler` turns it into one whole
denoising step on tensors only (DiT + true CFG + Euler), which the runtime may capture in a CUDA graph.
The loop never branches on backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from einops import rearrange
from torch import Tensor

from .configs import Version

# step_fn(img [2, 2N, 64] = (noisy | reference) x (cond, uncond), t [2], *conditioning) -> pred [2, 2N, 64]
StepFn = Callable[..., Tensor]
# update(x, ref, guidance, t, dt, rescale, *conditioning) -> next x: one denoising step, tensors only
UpdateFn = Callable[..., Tensor]
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


def position_ids(txt_len: int, h_tokens: int, w_tokens: int, version: Version, *, reference: bool = True) -> Tensor:
    """[1, txt_len + 2N, 3]: text all zero, noisy (0, r, c), reference v1.0 (0, r, c), v1.1 (1, r+1, c+1).
    Text-to-image has no reference tokens: [1, txt_len + N, 3]."""
    noisy = image_ids(h_tokens, w_tokens)
    ref = noisy.clone() if version == "v1.0" else image_ids(h_tokens, w_tokens, index=1.0, offset=1.0)
    return torch.cat([torch.zeros(txt_len, 3), noisy, *([ref] if reference else [])]).unsqueeze(0)


def cfg_norm_factor(diff_norm: Tensor) -> Tensor:
    """f(n) = n**0.4 where n > 1, else 1: damps large cond-uncond differences."""
    return torch.where(diff_norm > 1.0, diff_norm.pow(0.4), torch.ones_like(diff_norm))


def cfg_combine(cond: Tensor, uncond: Tensor, guidance: float | Tensor, rescale: bool | Tensor) -> Tensor:
    """True CFG: uncond + w (cond - uncond), the difference divided by f(||.||) over channels where rescale.

    `rescale` may be a bool tensor, so one captured graph serves the steps before and after the truncation.
    """
    diff = cond - uncond
    damp = cfg_norm_factor(diff.norm(dim=2, keepdim=True))
    factor = torch.where(torch.as_tensor(rescale, device=diff.device), damp, 1.0)
    return uncond + guidance * (diff / factor)  # x / 1.0 is exact: no rescale leaves diff unchanged


def guided_euler(step_fn: StepFn) -> UpdateFn:
    """One whole denoising step from a DiT call: (noisy | reference) x (cond, uncond) -> true CFG -> Euler
    on the noisy half (the reference half stays fixed; its prediction is discarded)."""

    def update(x: Tensor, ref: Tensor, guidance: Tensor, t: Tensor, dt: Tensor, rescale: Tensor,
               *conditioning: Tensor) -> Tensor:
        pred = step_fn(torch.cat([x, ref], dim=1).expand(2, -1, -1), t, *conditioning)
        return x + dt * cfg_combine(pred[:1], pred[1:], guidance, rescale)[:, : x.shape[1]]

    return update


def schedule_tensors(timesteps: list[float], truncate: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per step: t [S, 2] (both CFG branches), dt [S] (float32) and the CFG rescale switch t > truncate [S]."""
    pairs = list(pairwise(timesteps))
    t = torch.tensor([[a, a] for a, _ in pairs], dtype=torch.float32, device=device)
    dt = torch.tensor([b - a for a, b in pairs], dtype=torch.float32, device=device)
    rescale = torch.tensor([a > truncate for a, _ in pairs], dtype=torch.bool, device=device)
    return t, dt, rescale


def denoise(
    update: UpdateFn,
    x: Tensor,
    ref: Tensor,
    timesteps: list[float],
    *,
    guidance: float,
    truncate: float,
    conditioning: tuple[Tensor, ...] = (),
    progress: ProgressFn | None = None,
) -> Tensor:
    """Euler integration of the noisy tokens x [1, N, 64] (float32); the reference tokens ref [1, N, 64] stay fixed.

    `update` is `guided_euler(step_fn)` (or a CUDA-graphed copy of it); `conditioning` is passed to it
    explicitly, not closed over, so a captured graph reads this edit's tensors.
    """
    t, dt, rescale = schedule_tensors(timesteps, truncate, x.device)
    g = torch.tensor(guidance, dtype=torch.float32, device=x.device)
    for i in range(len(dt)):
        x = update(x, ref, g, t[i], dt[i], rescale[i], *conditioning)
        if progress is not None:
            progress(i + 1, len(dt))
    return x
