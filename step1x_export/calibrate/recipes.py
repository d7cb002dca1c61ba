"""Recipes: calibration statistics + weights -> the scales of a `QuantArtifact`.

- `fp8`: FP8 E4M3 W8A8. Activation scale = amax / 448 (static, per tensor); weight scale = row amax / 448
  (per output channel) or tensor amax / 448.
- `int8-sq`: INT8 SmoothQuant W8A8 (Xiao et al. 2023). Per input channel j,
  s_j = amax_x[j]^alpha / amax_w[j]^(1 - alpha); activations x / s and weights W * s give the same product
  with outliers moved from x into W. Activation scale = max_j(amax_x[j] / s_j) / 127 (per tensor, static);
  weight scale = row amax of W * s / 127 (symmetric, per output channel).

Which Linear layers are quantized is chosen by name patterns (fnmatch; a pattern starting with "re:" is
a regular expression): a layer is quantized if it matches an `include` pattern and no `exclude` pattern.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..choices import DEFAULT_EXCLUDE
from ..hashing import module_hash
from .artifact import LayerScales, QuantArtifact, dtype_name, weight_probe
from .formats import QuantFormat, scale_from_amax

if TYPE_CHECKING:  # collect imports the whole pipeline; recipes only need the type
    from .collect import InputStats


@dataclass(frozen=True)
class Recipe:
    name: str
    fmt: QuantFormat
    smooth: bool  # SmoothQuant: migrate activation outliers into the weights


RECIPES = {
    "fp8": Recipe("fp8", QuantFormat.FP8_E4M3, smooth=False),
    "int8-sq": Recipe("int8-sq", QuantFormat.INT8, smooth=True),
}

DEFAULT_INCLUDE: tuple[str, ...] = ("*",)
SMOOTH_EPS = 1e-5


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown quantization recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_layers(names: list[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """The names matching some `include` pattern and no `exclude` pattern, in the given order."""
    return [n for n in names if any(_matches(n, p) for p in include) and not any(_matches(n, p) for p in exclude)]


def smoothing_factors(channel_amax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant s [K] = amax_x^alpha / amax_w^(1 - alpha), amax_w over output rows of W [N, K]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_amax = weight.detach().float().abs().amax(dim=0).clamp(min=SMOOTH_EPS)
    s = channel_amax.float().clamp(min=SMOOTH_EPS).pow(alpha) / w_amax.pow(1.0 - alpha)
    return s.clamp(min=SMOOTH_EPS)


def layer_scales(linear: nn.Linear, stats: InputStats, recipe: Recipe, *, alpha: float,
                 per_channel: bool) -> LayerScales:
    """The scales of one Linear under `recipe`."""
    w = linear.weight.detach().float()
    x_amax = stats.channel_amax.to(w.device).float()
    smooth = None
    if recipe.smooth:
        smooth = smoothing_factors(x_amax, w, alpha)
        x_amax, w = x_amax / smooth, w * smooth[None, :]
    w_amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    return LayerScales(
        in_features=linear.in_features,
        out_features=linear.out_features,
        input_scale=scale_from_amax(x_amax.max(), recipe.fmt).cpu(),
        weight_scale=scale_from_amax(w_amax, recipe.fmt).cpu(),
        smooth=None if smooth is None else smooth.cpu(),
        weight_probe=weight_probe(linear.weight),
    )


def build_artifact(
    model: nn.Module,
    stats: dict[str, InputStats],
    recipe: str,
    *,
    alpha: float = 0.5,
    include: tuple[str, ...] = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    per_channel: bool = True,
    calibration: dict | None = None,
    model_hash: str | None = None,
    source: dict | None = None,
) -> QuantArtifact:
    """Scales for the selected Linear layers of `model` (the model the stats were collected on)."""
    r = get_recipe(recipe)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = select_layers(list(linears), tuple(include), tuple(exclude))
    if not chosen:
        raise ValueError(f"no Linear layer matches include {list(include)} minus exclude {list(exclude)}")
    missing = [n for n in chosen if n not in stats]
    if missing:
        raise ValueError(f"no calibration statistics for {missing[:5]} ({len(missing)} layers)")
    with torch.no_grad():
        layers = {n: layer_scales(linears[n], stats[n], r, alpha=alpha, per_channel=per_channel) for n in chosen}
    dtype = next(model.parameters()).dtype
    return QuantArtifact(
        recipe=r.name, fmt=r.fmt, model_hash=model_hash or module_hash(model), model_dtype=dtype_name(dtype),
        layers=layers, include=tuple(include), exclude=tuple(exclude), alpha=alpha if r.smooth else None,
        weight_granularity="per_channel" if per_channel else "per_tensor", calibration=calibration or {},
        source=source or {},
    )
