"""CUDA graphs in one small wrapper (flux-fast's `cudagraph()`): key by input shapes, static inputs,
warm up on a side stream, capture, then copy-in / replay / copy-out; at most `capacity` graphs kept.

Each graph has its own memory pool, so evicting the least recently used one (and emptying the
allocator's cache) gives its memory back: a server that sees every aspect ratio holds `capacity`
graphs, not one per size it ever saw. Without CUDA (or with graphs off) the same static buffers,
keying and eviction run eagerly, so the bookkeeping is exercised on CPU and the two paths differ
only in capture and replay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...choices import DEFAULT_GRAPH_CACHE

GraphKey = tuple[tuple[tuple[int, ...], torch.dtype, str], ...]


def graph_key(args: tuple[Tensor, ...]) -> GraphKey:
    return tuple((tuple(a.shape), a.dtype, str(a.device)) for a in args)


@dataclass
class GraphCounts:
    """What a runtime's graph caches did, summed over every wrapper it made (one per DiT instance)."""

    captured: int = 0  # graphs captured (a shape seen for the first time, or again after eviction)
    evicted: int = 0  # graphs dropped to stay within the cache's capacity


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

    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], *, enabled: bool,
                 capacity: int = DEFAULT_GRAPH_CACHE, warmup: int = 2, counts: GraphCounts | None = None):
        if capacity < 1:
            raise ValueError(f"CUDA graph cache capacity must be >= 1, got {capacity}")
        self.fn, self.enabled, self.capacity, self.warmup = fn, enabled, capacity, warmup
        self.counts = counts if counts is not None else GraphCounts()
        self.entries: OrderedDict[GraphKey, _Entry] = OrderedDict()  # least recently used first

    def __call__(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        key = graph_key(args)
        entry = self.entries.get(key)
        if entry is None:
            self._make_room()
            entry = self._record(key, args)
        self.entries.move_to_end(key)
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

    def _make_room(self) -> None:
        while len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)  # the graph, its pool and its static tensors go with the entry
            self.counts.evicted += 1
            if self.enabled:
                torch.cuda.empty_cache()  # hand the evicted pool's memory back to the device

    def _record(self, key: GraphKey, args: tuple[Tensor, ...]) -> _Entry:
        entry = _Entry(inputs=tuple(a.clone() for a in args))
        if self.enabled:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy init, cuBLAS handles, torch.compile, TensorRT's first enqueue
                for _ in range(self.warmup):
                    self.fn(*entry.inputs)
            torch.cuda.current_stream().wait_stream(side)
            entry.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(entry.graph):  # a private pool per graph: freed when the graph is evicted
                result = self.fn(*entry.inputs)
            entry.single, entry.outputs = not isinstance(result, tuple), _as_tuple(result)
            self.counts.captured += 1
        self.entries[key] = entry
        return entry

    @property
    def graphs(self) -> int:
        """Captured graphs held now (0 when running eagerly)."""
        return sum(e.graph is not None for e in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)
