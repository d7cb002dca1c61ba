"""Batched DiT calls in which each edit gets the very numbers it gets alone: GEMMs and activations lane by lane.

A batch changes how many rows each op of the DiT sees (2 per edit: its cond and uncond branch). BLAS picks
its GEMM kernel, so its summation order, by the row count: measured with MKL here, a [2, C] modulation vector
and the image tokens of a small edit round differently at 2B rows than at 2 (on its AVX2 path up to 48 rows
per edit). GELU and SiLU round differently on their vectorised and scalar paths, and ATen splits a large
element-wise op into per-thread chunks whose ends (scalar tails) move with its size. So inside a batched
call each `nn.Linear`, `nn.GELU` and `nn.SiLU` runs once per edit on its rows (adjacent: `sampling.Batch`),
the very call the edit alone makes, writing into the batch's output; the batch shares everything else
(attention, norms, RoPE, the exact element-wise ops, the per-op dispatch). The chunk count is static per
batch size, so a traced or captured step (torch.compile, CUDA graphs) holds B calls per module. A call of
one edit is left untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from ...step1x_ref.sampling import StepFn

LANE_ROWS = 2  # one edit's rows in a DiT call: its cond and uncond branch
LANE_MODULES = (nn.Linear, nn.GELU, nn.SiLU)
_FORWARDS: WeakKeyDictionary[nn.Module, Callable[[Tensor], Tensor]] = WeakKeyDictionary()


def _into(module: nn.Module, x: Tensor) -> Callable[[Tensor, Tensor], object] | None:
    """Writes `module`'s output for rows of `x` into a slice of the batch's output, the very kernel its forward
    calls (no concatenation to copy), or None where its forward takes another path for such an input."""
    if type(module) is nn.Linear and module.bias is not None and (x.dim() == 2 or x.dim() == 3 and x.is_contiguous()):
        w, b = module.weight, module.bias  # F.linear's own path here: addmm on the rows, the bias fused
        return lambda rows, out: torch.addmm(b, rows.reshape(-1, w.shape[1]), w.t(), out=out.view(-1, w.shape[0]))
    if type(module) is nn.GELU:
        return lambda rows, out: torch._C._nn.gelu(rows, approximate=module.approximate, out=out)
    if type(module) is nn.SiLU and not module.inplace:
        return lambda rows, out: torch._C._nn.silu(rows, out=out)
    return None


def _lane_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """`module`'s own forward, one edit's rows at a time (one function per module, so compiled guards hold)."""
    if module not in _FORWARDS:
        own = type(module).forward

        def forward(x: Tensor) -> Tensor:
            if x.shape[0] <= LANE_ROWS:
                return own(module, x)
            starts = range(0, x.shape[0], LANE_ROWS)
            into = _into(module, x)
            if into is None:
                return torch.cat([own(module, x[i : i + LANE_ROWS]) for i in starts])
            width = module.out_features if isinstance(module, nn.Linear) else x.shape[-1]
            out = x.new_empty(*x.shape[:-1], width)
            for i in starts:
                into(x[i : i + LANE_ROWS], out[i : i + LANE_ROWS])
            return out

        _FORWARDS[module] = forward
    return _FORWARDS[module]


def lane_members(module: nn.Module) -> list[nn.Module]:
    """`module`'s plain Linears (not quantized ones: their own types), GELUs and SiLUs: what runs lane by lane."""
    return [m for m in module.modules() if type(m) in LANE_MODULES]


@contextmanager
def lane_modules(members: list[nn.Module]) -> Iterator[None]:
    """While inside, `members` (`lane_members` of a module) run lane by lane."""
    for m in members:
        m.forward = _lane_forward(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in members:
            del m.forward


def lane_exact(step: StepFn, module: nn.Module | None) -> StepFn:
    """`step` (over the torch DiT `module`) with its GEMMs and activations lane by lane when it runs more than
    one edit."""
    if module is None:  # an engine without a torch module (ONNX Runtime, TensorRT) runs one edit per call
        return step
    members = lane_members(module)  # found once, not at every step: a loaded DiT's modules do not change

    def lanes_step(img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        if img.shape[0] <= LANE_ROWS:
            return step(img, t, *conditioning)
        with lane_modules(members):
            return step(img, t, *conditioning)

    return lanes_step
