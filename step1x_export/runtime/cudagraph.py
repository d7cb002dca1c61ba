"""CUDA graphs in one small wrapper (flux-fast's `cudagraph()`): key by input shapes, static inputs,
warm up on a side stream, capture, then copy-in / replay / copy-out.

Without CUDA (or with graphs off) the same static buffers and keying run eagerly, so the
bookkeeping is exercised on CPU and the two paths differ only in capture and replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

GraphKey = tuple[tuple[tuple[int, ...], torch.dtype, str], ...]


def graph_key(args: tuple[Tensor, ...]) -> GraphKey:
    return tuple((tuple(a.shape), a.dtype, str(a.device)) for a in args)


@dataclass
class _Entry:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...] = ()
    graph: torch.cuda.CUDAGraph | None = None
    single: bool = False  # fn returned one tensor, not a tuple


class CudaGraphed:
    """`fn(*tensors) -> tensor | tuple of tensors`, replayed from a graph captured once per input shapes.

    Returns what `fn` returns (a tensor or a tuple), as fresh copies of the static outputs.
    """

    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], *, enabled: bool, warmup: int = 2, pool=None):
        self.fn, self.enabled, self.warmup = fn, enabled, warmup
        self.pool = pool  # one graph memory pool shared by every graph of this runtime
        self.entries: dict[GraphKey, _Entry] = {}

    def __call__(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        key = graph_key(args)
        entry = self.entries.get(key) or self._record(key, args)
        for static, a in zip(entry.inputs, args, strict=True):
            static.copy_(a)
        if entry.graph is None:
            result = self.fn(*entry.inputs)
            entry.single = not isinstance(result, tuple)
            outputs = _as_tuple(result)
        else:
            entry.graph.replay()
            outputs = entry.outputs
        copies = tuple(o.clone() for o in outputs)  # copy-out: the static outputs are overwritten by the next replay
        return copies[0] if entry.single else copies

    def _record(self, key: GraphKey, args: tuple[Tensor, ...]) -> _Entry:
        entry = self.entries[key] = _Entry(inputs=tuple(a.clone() for a in args))
        if not self.enabled:
            return entry
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy init, cuBLAS handles, torch.compile, TensorRT's first enqueue
            for _ in range(self.warmup):
                self.fn(*entry.inputs)
        torch.cuda.current_stream().wait_stream(side)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph, pool=self.pool):
            result = self.fn(*entry.inputs)
        entry.single, entry.outputs = not isinstance(result, tuple), _as_tuple(result)
        return entry

    def clear(self) -> None:
        self.entries.clear()


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)
