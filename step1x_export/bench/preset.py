"""The 24gb preset's DiT built from the bench's bf16 one (FP8 W8A8 on the recipe's layers, int8 weight-only on
the rest) and the memory cap a 24 GB card puts on a process: what first light's preset row runs.

Calibration swaps every quantized Linear out of the DiT; the statistics collector is scoped to
`ladder.quantize`, so once it returns nothing refers to the bf16 Linears and their memory is free before the
capped edit (a collector kept alive would keep 23 GiB of swapped-out weights at full size).
"""

from __future__ import annotations

from torch import nn

from ..calibrate.qcheckpoint import WEIGHT_ONLY_DEFAULT
from ..calibrate.recipes import RECIPES, select_layers
from ..calibrate.weight_only import quantize_weights_
from .ladder import quantize
from .models import BenchModels, DiTInputs

GiB = 2**30
CARD_24GB_USABLE = 23.6 * GiB  # what a 24 GB card (RTX 4090 / L4: 23.6-23.7 GiB total) leaves to its processes


def quantize_24gb(models: BenchModels, calibration: DiTInputs) -> str:
    """Quantize `models.dit` in place as `--preset 24gb` loads it; returns what ran."""
    _, note = quantize(models, "fp8", [calibration])
    linears = [n for n, m in models.dit.named_modules() if type(m) is nn.Linear]
    quantize_weights_(models.dit, select_layers(linears, WEIGHT_ONLY_DEFAULT, ()), RECIPES["int8-sq"].fmt)
    return f"{note}; int8 weight-only on the rest"


def cap_fraction(context_bytes: int, total_bytes: int) -> float:
    """The allocator's share of this card that leaves a 24 GB card's usable memory minus the CUDA context."""
    return min(1.0, max(0.0, (CARD_24GB_USABLE - context_bytes) / total_bytes))
