"""Fake CUDA for contract tests: tensors on device "cuda" (no memory, ATen's meta checks run on every op) on
a CPU-only build, with torch.cuda answering as an H200 (compute capability 9.0) where the code asks.

`fake_h200()` makes tensors and runs modules eagerly on fake CUDA; `GemmLog` records every GEMM call (shapes,
strides, dtypes) and enforces the layouts the CUDA kernels need where ATen's meta functions do not (`_int_mm`
runs with a row-major weight, at a sixth of the speed). Python indexing (`t[:, :n]`) goes through a C++ path
that asks for a CUDA device guard, which a CPU build lacks, so `cuda_indexing` makes basic indexing of CUDA
tensors call the aten view ops it means (slice / select / unsqueeze); dynamo still records `getitem` in the
graph (it only runs its fake values through the patch), so a compiled block's graph is the GPU's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
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


_TENSOR_GETITEM = torch._C.TensorBase.__getitem__


def _getitem(self: torch.Tensor, index: object) -> torch.Tensor:
    basic = all(i is None or i is Ellipsis or isinstance(i, (int, slice))
                for i in (index if isinstance(index, tuple) else (index,)))
    if self.device.type == "cuda" and basic:
        return basic_index(self, index)
    return _TENSOR_GETITEM(self, index)


@contextmanager
def cuda_indexing() -> Iterator[None]:
    """Basic indexing of CUDA tensors as aten view ops (eager and while dynamo runs its fake tensors)."""
    with mock.patch.object(torch.Tensor, "__getitem__", _getitem):
        yield


@dataclass(frozen=True)
class GemmCall:
    op: str
    shapes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]


GEMMS = {aten._scaled_mm.default: "scaled_mm", aten._int_mm.default: "int_mm", aten.mm.default: "mm",
         aten.addmm.default: "addmm", aten.bmm.default: "bmm"}


class GemmLog(TorchDispatchMode):
    """Every GEMM dispatched while active; `_int_mm` must get its weight column-major and M > 16."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[GemmCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append(GemmCall(GEMMS[func], tuple(tuple(a.shape) for a in tensors),
                                       tuple(a.stride() for a in tensors), tuple(a.dtype for a in tensors)))
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
def h200_answers() -> Iterator[None]:
    """torch.cuda says: available, an H200 (capability 9.0)."""
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: H200), \
            mock.patch.object(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200"), cuda_indexing(), \
            torch.no_grad():
        yield


@contextmanager
def tracing() -> Iterator[None]:
    """For dynamo over modules built under `fake_h200` (their kernels already chosen): torch.cuda tells the
    truth here, because dynamo saves the CUDA RNG state when it believes CUDA is there."""
    with cuda_indexing(), torch.no_grad():
        yield


@contextmanager
def fake_h200() -> Iterator[FakeTensorMode]:
    """Build and run on fake "cuda" tensors, torch.cuda answering as an H200. Without grad: autograd's
    metadata for a fake CUDA tensor asks for a device guard too (and aborts the process, not raises)."""
    with h200_answers(), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def run_in_fake_mode(gm: torch.fx.GraphModule):
    """What a recording backend hands back: the graph, run under its fake inputs' mode (outside it, an op
    on a fake CUDA tensor would initialise CUDA)."""
    def run(*args: object) -> object:
        mode = next(a.fake_mode for a in args if isinstance(a, FakeTensor))
        with mode, torch.no_grad():
            return gm(*args)

    return run


@torch.library.custom_op("fake_cuda::attention", mutates_args=())
def _opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


@_opaque_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


@contextmanager
def opaque_attention() -> Iterator[None]:
    """SDPA as an opaque op of the same shapes: SDPA's own kernel choice on symbolic token counts asks for a
    CUDA device guard on a CPU build, so a dynamic-shape trace stands it in (static traces keep the real one)."""
    def sdpa(q, k, v, *args, **kwargs):
        return _opaque_attention(q, k, v)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa):
        yield
