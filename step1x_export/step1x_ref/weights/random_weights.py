"""Seeded random weights with O(1) activations, for the tiny demo, tests and latency runs.

No checkpoint can be downloaded where this project is tested: the reference model is checked
against independent implementations on the same random weights instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place: weights ~ U(+-1/sqrt(fan_in)), norm scales ~ 1 + 0.1 N, biases small."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        values = torch.empty(p.shape, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2:
            bound = 1 / math.sqrt(p[0].numel())
            values.uniform_(-bound, bound, generator=gen)
        elif leaf in ("scale", "weight") and p.ndim == 1:  # norm scales
            values.normal_(1.0, 0.1, generator=gen)
        else:  # biases, connector.scale_factor
            values.normal_(0.0, 0.02, generator=gen)
        p.copy_(values.to(p.dtype))
    return module
