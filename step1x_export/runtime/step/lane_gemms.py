"""Batched DiT calls in which each edit gets the very numbers it gets alone: GEMMs and activations lane by lane.

A batch changes how many rows each op of the DiT sees (2 per edit: its cond and uncond branch). BLAS picks
its GEMM kernel, so its summation order, by the row count: measured with MKL here, a [2, C] modulation vector
and the image tokens of a small edit round differently at 2B rows than at 2 (on its AVX2 path up to 48 rows
per edit). GELU and SiLU round differently on their vectorised and scalar paths, and ATen splits a large
element-wise op into per-thread chunks whose ends (scalar tails) move with its size. So inside a batched
call each plain Linear's `F.linear` (its weight an `nn.Parameter`: quantized layers flatten their rows and
keep their own kernels), each GELU and each SiLU runs once per edit on its rows (adjacent: `sampling.Batch`),
the very call the edit alone makes, writing into the batch's output; the batch shares everything else
(attention, norms, RoPE, the exact element-wise ops, the per-op dispatch). The chunk count is static per
batch size, so a traced step (torch.compile) holds B calls per Linear. A call of one edit is left untouched.

The routing is a `TorchFunctionMode` entered for the length of the batched call: thread-local, nothing on the
DiT's modules changes and nothing refers to them afterwards, so two runtimes sharing a DiT do not race and a
closed runtime frees it. It is what CPU promises (bit for bit); on CUDA a batch differs from the edit alone
anyway (8-bit layers run batched, compiled kernels are specialised per batch), so there the runtime makes
plain batched calls unless `RuntimeOptions.exact_batches` asks for lanes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...step1x_ref.sampling import StepFn

LANE_ROWS = 2  # one edit's rows in a DiT call: its cond and uncond branch
LANE_MODULES = (nn.Linear, nn.GELU, nn.SiLU)
_ACTIVATIONS = {torch._C._nn.gelu, F.gelu, F.silu}


def _linear_lanes(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear on each edit's rows: addmm into a slice of the batch's output (F.linear's own path for such
    an input, the bias fused, nothing concatenated), else F.linear per lane."""
    starts = range(0, x.shape[0], LANE_ROWS)
    if bias is None or not (x.dim() == 2 or x.dim() == 3 and x.is_contiguous()):
        return torch.cat([F.linear(x[i : i + LANE_ROWS], weight, bias) for i in starts])
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for i in starts:
        rows = x[i : i + LANE_ROWS]
        torch.addmm(bias, rows.reshape(-1, weight.shape[1]), weight.t(),
                     out=out[i : i + LANE_ROWS].view(-1, weight.shape[0]))
    return out


def _activation_lanes(func: Callable[..., Tensor], x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """GELU / SiLU on each edit's rows, the very kernel the edit alone runs, into the batch's output."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], LANE_ROWS):
        rows, into = x[i : i + LANE_ROWS], out[i : i + LANE_ROWS]
        if func is F.silu:
            torch._C._nn.silu(rows, out=into)
        else:
            torch._C._nn.gelu(rows, approximate=kwargs.get("approximate", "none"), out=into)
    return out


class LaneByLane(TorchFunctionMode):
    """While active (this thread only), plain Linears' GEMMs, GELU and SiLU on more than one edit's rows run
    one edit's rows at a time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] > LANE_ROWS:
            if func is torch._C._nn.linear and len(args) >= 2 and type(args[1]) is nn.Parameter:
                return _linear_lanes(x, args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
            if func in _ACTIVATIONS and not kwargs.get("inplace", False) and len(args) == 1:
                return _activation_lanes(func, x, kwargs)
        return func(*args, **kwargs)


def lane_members(module: nn.Module) -> list[nn.Module]:
    """`module`'s plain Linears (not quantized ones: their own types), GELUs and SiLUs: what runs lane by lane."""
    return [m for m in module.modules() if type(m) in LANE_MODULES]


@contextmanager
def lane_modules(members: list[nn.Module]) -> Iterator[None]:
    """While inside, `members` (`lane_members` of a module) run lane by lane (nothing is routed without any)."""
    if not members:
        yield
        return
    with LaneByLane():
        yield


def lane_exact(step: StepFn, module: nn.Module | None) -> StepFn:
    """`step` (over the torch DiT `module`) with its GEMMs and activations lane by lane when it runs more than
    one edit."""
    if module is None or not lane_members(module):  # ONNX Runtime, TensorRT: one edit per call
        return step

    def lanes_step(img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        if img.shape[0] <= LANE_ROWS:
            return step(img, t, *conditioning)
        with LaneByLane():
            return step(img, t, *conditioning)

    return lanes_step
