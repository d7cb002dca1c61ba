"""Fake CUDA for contract tests: tensors on device "cuda" (no memory, ATen's meta checks run on every op) on
a CPU-only build, with torch.cuda answering as an H200 (compute capability 9.0) where the code asks.

`fake_h200()` makes tensors and runs modules eagerly on fake CUDA; `GemmLog` records every GEMM call (shapes,
strides, dtypes) and enforces the layouts the CUDA kernels need where ATen's meta functions do not (`_int_mm`
runs with a row-major weight, at a sixth of the speed). Python indexing (`t[:, :n]`) goes through a C++ path
that asks for a CUDA device guard, which a CPU build lacks, so `CudaIndexing` (a function mode, gone when it
exits) makes basic indexing call the aten view ops it means (slice / select / unsqueeze). Dynamo traces on
`meta` tensors instead, with the GPU kernels forced as on a GPU: its fake values of meta tensors need no device
guard (dynamo's own indexing and symbolic SDPA would ask for one on fake CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
H200 = (9, 0)
_END = 2**62  # a slice without a stop


def basic_index(t: torch.Tensor, index: object) -> torch.Tensor:
    """t[index] for slices, ints, None and Ellipsis, as aten view ops."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        named = sum(i is not None and i is not Ellipsis for i in index)
        index = index[:k] + (slice(None),) * (t.dim() - named) + index[k + 1:]
    dim = 0
    for i in index:
        if i is None:
            t, dim = t.unsqueeze(dim), dim + 1
        elif isinstance(i, slice):
            if i != slice(None):
                t = aten.slice.Tensor(t, dim, 0 if i.start is None else i.start, _END if i.stop is None else i.stop,
                                      1 if i.step is None else i.step)
            dim += 1
        elif isinstance(i, int):
            t = t.select(dim, i)
        else:
            raise TypeError(f"fake-CUDA indexing takes slices, ints, None and ...; got {type(i).__name__}")
    return t


class CudaIndexing(TorchFunctionMode):
    """Basic indexing of tensors as aten view ops, while the mode is active (eager fake-CUDA runs only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            return basic_index(*args)
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class GemmCall:
    op: str
    shapes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]


GEMMS = {aten._scaled_mm.default: "scaled_mm", aten._int_mm.default: "int_mm", aten.mm.default: "mm",
         aten.addmm.default: "addmm", aten.bmm.default: "bmm"}


def check_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    bias: torch.Tensor | None = None, scale_result: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None, use_fast_accum: bool = False) -> None:
    """What CUDA's `_scaled_mm` refuses and its meta function lets through: row-wise scales (either scale more
    than one value) with any output but bf16, and a bias whose dtype is not the output's."""
    out = out_dtype or a.dtype
    if (scale_a.numel() > 1 or scale_b.numel() > 1) and out != torch.bfloat16:
        raise RuntimeError(f"_scaled_mm: row-wise scaling needs a bf16 output, got {out}")
    if bias is not None and bias.dtype != out:
        raise RuntimeError(f"_scaled_mm: the bias must have the output's dtype {out}, got {bias.dtype}")


class GemmLog(TorchDispatchMode):
    """Every GEMM dispatched while active; `_int_mm` must get its weight column-major and M > 16, `_scaled_mm`
    the output and bias dtypes CUDA accepts (`check_scaled_mm`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[GemmCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append(GemmCall(GEMMS[func], tuple(tuple(a.shape) for a in tensors),
                                       tuple(a.stride() for a in tensors), tuple(a.dtype for a in tensors)))
            if func is aten._scaled_mm.default:
                check_scaled_mm(*args, **(kwargs or {}))
            if func is aten._int_mm.default:
                a, b = args[0], args[1]
                if b.stride(0) != 1:
                    raise RuntimeError(f"_int_mm: mat2 must be column-major, got stride {b.stride()}")
                if a.shape[0] <= 16:
                    raise RuntimeError(f"_int_mm: CUDA needs M > 16, got {a.shape[0]}")
        return func(*args, **(kwargs or {}))

    def ops(self) -> list[str]:
        return [c.op for c in self.calls]


@contextmanager
def fake_h200() -> Iterator[FakeTensorMode]:
    """Build and run on fake "cuda" tensors, torch.cuda answering as an H200 (available, capability 9.0).
    Without grad: autograd's metadata for a fake CUDA tensor asks for a device guard too (and aborts the
    process, not raises)."""
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: H200), \
            mock.patch.object(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200"), \
            torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode, CudaIndexing():
        yield mode
