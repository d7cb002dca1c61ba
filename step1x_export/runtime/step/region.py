"""RegionE's decisions: which steps run in full, which only on the edited tokens, which reuse their velocity,
and which tokens an edit changes (the partition). Plain functions of the schedule and the latents; the step
that carries them out is `region_step`.

The rule, as RegionE's Step1X-Edit pipelines (v1.0 / v1.1 and v1.2) implement it, with 0-based steps i of 28,
warm-up w, post p, refresh steps r (1-based):

- steps i < w run in full; on step w - 1 the final latent is predicted in one Euler step (x - t_i v) and
  compared with the reference latent per token: cosine similarity <= threshold marks a token edited, then the
  mask is eroded (3x3 cross, zero padding) and dilated (5x5 square) to drop isolated tokens;
- on that step the unedited tokens jump with this velocity straight to the next anchor's time (the first
  refresh step, then the first post step), the edited ones take the ordinary step;
- steps w .. 27 - p run on the edited tokens only (the region phase), except each refresh step r - 1, which
  runs in full again (renewing the cached keys and values; the unedited tokens jump on to the next anchor);
- steps i >= 28 - p run in full (every token has rejoined at the same time);
- in the region phase a step may reuse the last computed velocity, scaled: with the fitted decay constant
  gamma[i - 1], ratio = gamma[i - 1] (1 + t_i - t_{i-1}); ratio >= 1 computes; else the product of the ratios
  since the last computed step is taken, and while 1 - product <= the cache threshold the step reuses
  velocity * ratio, else it computes (and the product restarts). The first region step after warm-up always
  computes; the one after a refresh may reuse the refresh step's velocity. All in float32, as published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .caching import CacheStats
from .region_spec import REGION_STEPS, RegionParams

# The velocity decay constants gamma[i - 1] of step i, fitted by RegionE's authors per model (float16 as published).
GAMMA_V1X = (0.9746, 0.9593, 1.0036, 1.0084, 1.0106, 1.0114, 1.0138, 1.0163, 1.0152, 1.0163, 1.0197, 1.0186,
             1.0219, 1.0218, 1.0223, 1.0266, 1.0272, 1.0305, 1.0311, 1.0362, 1.0385, 1.0423, 1.0500, 1.0536,
             1.0671, 1.0866, 1.1015)
GAMMA_V1P2 = (0.7936, 0.9807, 1.0063, 1.0205, 0.9946, 1.0125, 1.0116, 1.0125, 1.0172, 1.0171, 1.0183, 1.0170,
              1.0170, 1.0236, 1.0263, 1.0264, 1.0277, 1.0321, 1.0338, 1.0361, 1.0396, 1.0454, 1.0492, 1.0566,
              1.0696, 1.0879, 1.1179)

FULL, CAPTURE, REGION, REUSE = "full", "capture", "region", "reuse"


@dataclass(frozen=True)
class RegionPlan:
    """Per step its kind (full / capture: full and caching keys and values / region / reuse) and the decay
    ratio a reused step scales the velocity by; per capture step the step whose time the unedited tokens jump to."""

    kinds: tuple[str, ...]
    ratios: tuple[float, ...]
    jumps: dict[int, int]
    partition_step: int | None


def gamma_for(version: str) -> Tensor:
    return torch.tensor(GAMMA_V1P2 if version == "v1.2" else GAMMA_V1X, dtype=torch.float16)


def region_plan(params: RegionParams, t: Tensor, gamma: Tensor) -> RegionPlan:
    """The steps' kinds for timesteps t [28] (float32, t_0 = 1 first); they do not depend on the latents."""
    steps = len(t)
    if steps != REGION_STEPS:
        raise ValueError(f"regione needs {REGION_STEPS} steps (its decay constants were fitted for them), got {steps}")
    w, end = params.warmup, steps - params.post
    if w >= end:  # no region phase: every step in full
        return RegionPlan((FULL,) * steps, (1.0,) * steps, {}, None)
    refresh = [r - 1 for r in params.refresh]
    anchors = [w - 1, *refresh, end]
    jumps = dict(zip(anchors[:-1], anchors[1:], strict=True))
    kinds, ratios = [], []
    acc = torch.ones((), dtype=torch.float32)
    for i in range(steps):
        ratio = torch.ones((), dtype=torch.float32)
        if i < w - 1 or i >= end:
            kind = FULL
        elif i in jumps:
            kind = CAPTURE
        elif i == w:
            kind = REGION
        else:
            ratio = gamma[i - 1].float() * (1 + (t[i] - t[i - 1]))
            kind = REGION
            if ratio < 1:
                acc = acc * ratio
                kind = REGION if 1 - acc > params.cache else REUSE
        if kind != REUSE:
            acc = torch.ones((), dtype=torch.float32)
        kinds.append(kind)
        ratios.append(float(ratio) if kind == REUSE else 1.0)
    return RegionPlan(tuple(kinds), tuple(ratios), jumps, w - 1)


def erode_dilate(mask: Tensor) -> Tensor:
    """Isolated edited tokens removed: erosion by a 3x3 cross, then dilation by a 5x5 square (zero padding)."""
    m = mask.float()[None, None]
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=m.device)[None, None]
    eroded = (F.conv2d(m, cross, padding=1) == cross.sum()).float()
    return (F.conv2d(eroded, torch.ones(1, 1, 5, 5, device=m.device), padding=2) > 0)[0, 0]


def edited_tokens(predicted: Tensor, ref: Tensor, grid: tuple[int, int], params: RegionParams) -> Tensor:
    """Indices (ascending) of the edited tokens: predicted final latent [N, 64] vs reference [N, 64] on the
    token grid (rows, cols)."""
    similarity = (F.normalize(predicted.float(), dim=-1) * F.normalize(ref.float(), dim=-1)).sum(-1)
    mask = similarity <= params.threshold
    if params.erode:
        mask = erode_dilate(mask.reshape(grid)).flatten()
    return mask.nonzero().flatten()


@dataclass
class RegionStats(CacheStats):
    """The last edit under RegionE: per step its kind and the image tokens each DiT call ran on (the noisy and
    reference tokens in full; the edited ones in the region phase; none when reused); per capture step the
    edited token indices (the partition, kept through each refresh). `computed` / `reused` count steps."""

    kinds: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    edited: dict[int, list[int]] = field(default_factory=dict)
    image_tokens: int = 0  # noisy tokens of the edit (the reference has as many)

    def record_step(self, kind: str, tokens: int) -> None:
        self.record(kind != REUSE)
        self.kinds.append(kind)
        self.tokens.append(tokens)

    def __str__(self) -> str:
        if not self.edited:
            return f"RegionE: no partition, {len(self.kinds)} steps in full"
        edited = len(next(iter(self.edited.values())))
        share = sum(self.tokens) / max(1, 2 * self.image_tokens * len(self.tokens))
        return (f"RegionE: {edited}/{self.image_tokens} tokens edited; steps: {self.kinds.count(FULL)} full, "
                f"{self.kinds.count(CAPTURE)} full + cache, {self.kinds.count(REGION)} region, "
                f"{self.kinds.count(REUSE)} reused; image tokens computed: {100 * share:.0f}% of uncached")
