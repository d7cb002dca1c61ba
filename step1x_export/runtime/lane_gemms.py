"""Batched DiT calls in which each edit gets the very numbers it gets alone: every Linear runs lane by lane.

A batch changes how many rows each GEMM of the DiT has (2 per edit: its cond and uncond branch), and BLAS
picks its kernel, so its summation order, by the row count: measured with MKL here, a [2, C] modulation
vector and the image tokens of a small edit round differently at 2B rows than at 2 (on its AVX2 path up to
48 rows per edit). So inside a batched call each `nn.Linear` runs as B GEMMs of one edit's rows (adjacent:
`sampling.Batch`), the very call the edit alone makes; the batch shares everything else (attention, norms,
RoPE, the element-wise ops, the per-op dispatch). The chunk count is static per batch size, so a traced or
captured step (torch.compile, CUDA graphs) holds B GEMMs per Linear. A call of one edit is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..step1x_ref.sampling import StepFn

LANE_ROWS = 2  # one edit's rows in a DiT call: its cond and uncond branch
# GEMMs pick kernels by row count; GELU and SiLU round differently on their vectorised and scalar paths, and
# ATen splits a large element-wise op into per-thread chunks whose ends (scalar tails) move with its size.
LANE_MODULES = (nn.Linear, nn.GELU, nn.SiLU)
_FORWARDS: WeakKeyDictionary[nn.Module, Callable[[Tensor], Tensor]] = WeakKeyDictionary()


def _lane_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """`module`'s own forward, one edit's rows at a time (one function per module, so compiled guards hold)."""
    if module not in _FORWARDS:
        own = type(module).forward

        def forward(x: Tensor) -> Tensor:
            if x.shape[0] <= LANE_ROWS:
                return own(module, x)
            return torch.cat([own(module, x[i : i + LANE_ROWS]) for i in range(0, x.shape[0], LANE_ROWS)])

        _FORWARDS[module] = forward
    return _FORWARDS[module]


@contextmanager
def lane_modules(module: nn.Module) -> Iterator[None]:
    """While inside, `module`'s plain Linears (not quantized ones: their own types), GELUs and SiLUs run lane
    by lane."""
    chunked = [m for m in module.modules() if type(m) in LANE_MODULES]
    for m in chunked:
        m.forward = _lane_forward(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in chunked:
            del m.forward


def lane_exact(step: StepFn, module: nn.Module | None) -> StepFn:
    """`step` (over the torch DiT `module`) with its GEMMs and activations lane by lane when it runs more than
    one edit."""
    if module is None:  # an engine without a torch module (ONNX Runtime, TensorRT) runs one edit per call
        return step

    def lanes_step(img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        if img.shape[0] <= LANE_ROWS:
            return step(img, t, *conditioning)
        with lane_modules(module):
            return step(img, t, *conditioning)

    return lanes_step
