"""Sampler: shifted schedule, packing, position ids, true CFG with norm rescale, Euler denoising.

`denoise` is the one loop every backend runs. A backend gives a `step_fn(img, t, *conditioning) -> pred`
(a torch module, an ONNX Runtime session, a TensorRT engine); `guided_euler` turns it into one whole
denoising step on tensors only (DiT + true CFG + Euler), which the runtime may capture in a CUDA graph.
The loop never branches on backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from einops import rearrange
from torch import Tensor

from .configs import Version

# step_fn(img [2B, 2N, 64] = (noisy | reference) x (cond, uncond) per lane, t [2B], *conditioning) -> pred [2B, 2N, 64]
StepFn = Callable[..., Tensor]
# update(x [B, N, 64], ref, guidance [B], t [B], dt [B], rescale [B], *conditioning) -> next x: one step of B edits
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
    """One whole denoising step of B edits from one DiT call: (noisy | reference) x (cond lanes, uncond lanes)
    -> true CFG per lane -> Euler on the noisy half (the reference half stays fixed; its prediction is discarded).

    x, ref [B, N, 64]; guidance, t, dt, rescale [B] (each lane its own); the per-branch conditioning is
    [2B, ...], each lane's cond row then its uncond row (`Batch`), so the DiT sees batch 2B and timesteps [2B]
    and lane i owns rows 2i and 2i + 1, as an edit alone owns rows 0 and 1. CFG and Euler run per lane, on
    exactly the tensors the edit alone has: the rescale's pow and norm then round as they do alone, whatever
    the batch (their vectorised and scalar paths split elements by count).
    """

    def update(x: Tensor, ref: Tensor, guidance: Tensor, t: Tensor, dt: Tensor, rescale: Tensor,
               *conditioning: Tensor) -> Tensor:
        b, n = x.shape[:2]
        pred = step_fn(torch.cat([x, ref], dim=1).repeat_interleave(2, dim=0), t.repeat_interleave(2), *conditioning)
        lanes = [x[i : i + 1] + dt[i : i + 1].view(1, 1, 1)
                 * cfg_combine(pred[2 * i : 2 * i + 1], pred[2 * i + 1 : 2 * i + 2], guidance[i : i + 1].view(1, 1, 1),
                               rescale[i : i + 1].view(1, 1, 1))[:, :n]
                 for i in range(b)]  # a static count: one traced graph per batch size
        return lanes[0] if b == 1 else torch.cat(lanes)

    return update


def schedule_tensors(timesteps: list[float], truncate: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per step: t [S], dt [S] (float32) and the CFG rescale switch t > truncate [S]."""
    pairs = list(pairwise(timesteps))
    t = torch.tensor([a for a, _ in pairs], dtype=torch.float32, device=device)
    dt = torch.tensor([b - a for a, b in pairs], dtype=torch.float32, device=device)
    rescale = torch.tensor([a > truncate for a, _ in pairs], dtype=torch.bool, device=device)
    return t, dt, rescale


@dataclass(eq=False)
class Lane:
    """One edit in the denoising loop: its noisy tokens x [1, N, 64] (float32), fixed reference tokens ref
    [1, N, 64], conditioning, and its own schedule and guidance. The loop advances `x` and `step`.

    Conditioning tensors with a leading 2 are per CFG branch (cond, uncond) and are stacked across lanes;
    the others (leading 1: the RoPE table, a function of the size only) are shared by every lane of a batch,
    which is why only same-size edits share one.
    """

    x: Tensor
    ref: Tensor
    t: Tensor  # [S]
    dt: Tensor  # [S]
    rescale: Tensor  # [S] bool
    guidance: Tensor  # [1] float32
    conditioning: tuple[Tensor, ...] = ()
    progress: ProgressFn | None = None
    step: int = 0  # steps done
    error: BaseException | None = None  # set when its progress callback raised (e.g. cancelled): it left early
    tag: object = None  # the caller's handle on this edit
    batch_sizes: list[int] = field(default_factory=list)  # lanes sharing each of its steps (padding excluded)

    @classmethod
    def of(cls, x: Tensor, ref: Tensor, timesteps: list[float], *, guidance: float, truncate: float,
           conditioning: tuple[Tensor, ...] = (), progress: ProgressFn | None = None, tag: object = None) -> Lane:
        t, dt, rescale = schedule_tensors(timesteps, truncate, x.device)
        g = torch.tensor([guidance], dtype=torch.float32, device=x.device)
        return cls(x, ref, t, dt, rescale, g, conditioning, progress, tag=tag)

    @property
    def steps(self) -> int:
        return len(self.dt)

    @property
    def done(self) -> bool:
        return self.step >= self.steps or self.error is not None

    def advance(self, x: Tensor, batch: int) -> None:
        """Take this step's result and report it; a raising progress callback ends this lane only."""
        self.x, self.step = x, self.step + 1
        self.batch_sizes.append(batch)
        if self.progress is not None:
            try:
                self.progress(self.step, self.steps)
            except Exception as e:  # the edit's own stop (cancelled, deadline): the other lanes go on
                self.error = e


def stack_rows(rows: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Lanes' conditioning as one batch: per-branch tensors (leading 2) concatenated, each lane's (cond, uncond)
    rows together (lane i at rows 2i, 2i + 1); a tensor with leading 1 is shared by the batch (the RoPE table)."""
    def stack(parts: list[Tensor]) -> Tensor:
        if len(parts) == 1 or parts[0].shape[0] == 1:  # one lane, or shared by the batch
            return parts[0]
        return torch.cat(parts)

    return tuple(stack([r[i] for r in rows]) for i in range(len(rows[0])))


StackFn = Callable[[list[tuple[Tensor, ...]]], tuple[Tensor, ...]]


class Batch:
    """The lanes running together: their per-branch conditioning stacked once per change of membership
    (`stack`: the version's rule, e.g. v1.2's texts padded to the longest)."""

    def __init__(self, lanes: list[Lane], padded: int, stack: StackFn = stack_rows):
        self.lanes, self.padded = lanes, padded
        rows = lanes + [lanes[-1]] * (padded - len(lanes))  # padding repeats a real lane: finite, discarded
        self.rows = rows
        self.ref = rows[0].ref if len(rows) == 1 else torch.cat([r.ref for r in rows])
        self.conditioning = rows[0].conditioning if len(rows) == 1 else stack([r.conditioning for r in rows])

    def step_inputs(self) -> tuple[Tensor, ...]:
        """x, ref, guidance, t, dt, rescale of this step, each lane at its own step."""
        if len(self.rows) == 1:
            lane, i = self.rows[0], self.rows[0].step
            return lane.x, lane.ref, lane.guidance, lane.t[i : i + 1], lane.dt[i : i + 1], lane.rescale[i : i + 1]
        x = torch.cat([r.x for r in self.rows])
        g = torch.cat([r.guidance for r in self.rows])
        t, dt, rescale = (torch.stack([getattr(r, name)[r.step] for r in self.rows]) for name in ("t", "dt", "rescale"))
        return x, self.ref, g, t, dt, rescale


JoinFn = Callable[[int], list[Lane]]  # (free places) -> lanes joining at this step boundary
LeaveFn = Callable[[list[Lane]], None]  # lanes whose schedules ended at this step (or stopped early: lane.error)


def denoise_lanes(update: UpdateFn, lanes: list[Lane], *, join: JoinFn | None = None, leave: LeaveFn | None = None,
                  max_batch: int = 1, pad_to: Callable[[int], int] = lambda b: b, stack: StackFn = stack_rows) -> None:
    """The denoising loop: every active lane takes one step per `update` call, each at its own timestep and
    guidance. At each step boundary `join` may add lanes (up to `max_batch` running); lanes leave, through
    `leave` (together when they end at the same step), once their own schedules end. Returns when no lane is
    left and `join` offers none.

    `pad_to(b)` rounds the batch up (repeating the last lane) so that a CUDA graph per size bucket serves
    nearby batch sizes; `stack` joins the lanes' conditioning (the version's rule). An exception from `update`
    propagates: the caller owns the lanes still running.
    """
    active = list(lanes)
    batch: Batch | None = None
    while True:
        if join is not None and len(active) < max_batch:
            joined = join(max_batch - len(active))
            active += joined
            batch = None if joined else batch
        if not active:
            return
        if batch is None:
            batch = Batch(active, max(pad_to(len(active)), len(active)), stack)
        out = update(*batch.step_inputs(), *batch.conditioning)
        for i, lane in enumerate(active):
            lane.advance(out[i : i + 1], len(active))
        finished = [lane for lane in active if lane.done]
        if finished:
            active, batch = [lane for lane in active if not lane.done], None
            if leave is not None:
                leave(finished)


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
    """Euler integration of one edit's noisy tokens x [1, N, 64] (float32); the reference tokens ref [1, N, 64]
    stay fixed: `denoise_lanes` with a single lane.

    `update` is `guided_euler(step_fn)` (or a CUDA-graphed copy of it); `conditioning` is passed to it
    explicitly, not closed over, so a captured graph reads this edit's tensors.
    """
    lane = Lane.of(x, ref, timesteps, guidance=guidance, truncate=truncate, conditioning=conditioning,
                   progress=progress)
    denoise_lanes(update, [lane])
    if lane.error is not None:
        raise lane.error
    return lane.x
