"""The denoising step over any dit Engine: as a `StepFn` for `sampling.denoise`, and fused
(DiT + CFG combine + Euler update in one call on tensors only) for CUDA-graph capture.

Neither branches on backend: the engine is a callable with the spec's named inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor

from ..step1x_ref.sampling import ProgressFn, StepFn, cfg_norm_factor
from .engine import Engine

# fused(x, ref, pe, llm_embedding, llm_mask, guidance, t, dt, rescale) -> (x_next,)
FusedStep = Callable[..., tuple[Tensor, ...]]


def engine_step_fn(dit: Engine, pe: Tensor, llm_embedding: Tensor, llm_mask: Tensor) -> StepFn:
    """(img [2, 2N, 64], t [2]) -> pred float32, for `sampling.denoise`."""

    def step(img: Tensor, t: Tensor) -> Tensor:
        return dit(img=img, pe=pe, timestep=t, llm_embedding=llm_embedding, llm_mask=llm_mask)["pred"].float()

    return step


def make_fused_step(dit: Engine) -> FusedStep:
    """One whole denoising step as a function of tensors only (no host sync, no Python branch on data).

    The CFG rescale switch is a bool tensor, so one captured graph serves every step of a schedule;
    the maths equals `sampling.cfg_combine` and `denoise`'s Euler update.
    """

    def fused(x: Tensor, ref: Tensor, pe: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
              guidance: Tensor, t: Tensor, dt: Tensor, rescale: Tensor) -> tuple[Tensor]:
        n = x.shape[1]
        img = torch.cat([x, ref], dim=1).expand(2, -1, -1)
        pred = dit(img=img, pe=pe, timestep=t, llm_embedding=llm_embedding, llm_mask=llm_mask)["pred"].float()
        cond, uncond = pred[:1], pred[1:]
        diff = cond - uncond
        factor = torch.where(rescale, cfg_norm_factor(torch.norm(diff, dim=2, keepdim=True)), 1.0)
        guided = uncond + guidance * (diff / factor)
        return (x + dt * guided[:, :n],)

    return fused


def schedule_tensors(timesteps: list[float], truncate: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per step: t [S, 2], dt [S] (float32, as `denoise` rounds them) and the rescale switch [S] (bool)."""
    pairs = list(pairwise(timesteps))
    t = torch.tensor([[a, a] for a, _ in pairs], dtype=torch.float32, device=device)
    dt = torch.tensor([b - a for a, b in pairs], dtype=torch.float32, device=device)
    rescale = torch.tensor([a > truncate for a, _ in pairs], dtype=torch.bool, device=device)
    return t, dt, rescale


def denoise_fused(
    step: FusedStep,
    x: Tensor,
    ref: Tensor,
    pe: Tensor,
    llm_embedding: Tensor,
    llm_mask: Tensor,
    timesteps: list[float],
    *,
    guidance: float,
    truncate: float,
    progress: ProgressFn | None = None,
) -> Tensor:
    """`sampling.denoise` with each iteration one call of a fused step (what a CUDA graph replays)."""
    t, dt, rescale = schedule_tensors(timesteps, truncate, x.device)
    g = torch.tensor(guidance, dtype=torch.float32, device=x.device)
    for i in range(len(dt)):
        (x,) = step(x, ref, pe, llm_embedding, llm_mask, g, t[i], dt[i], rescale[i])
        if progress is not None:
            progress(i + 1, len(dt))
    return x
