"""Activation memory of a forward, measured on `meta` tensors: no weights, no device, the real shapes.

`trace_peak` runs a module on meta inputs under a dispatch mode that sees every tensor an operator
allocates; each new storage adds its bytes to a running total and a weakref on the storage takes
them off when the last tensor using it dies (as the caching allocator gets a block back). The peak
of that total is the forward's activation peak on top of its weights and inputs. What it does not
see: allocator rounding (blocks of 512 B, segments of 2 MB) and fragmentation, library workspaces
(cuBLAS, cuDNN, flash attention's), and fused kernels that skip a temporary (torch.compile).

Attention is traced as the fused kernel a GPU runs (`fused_attention`): eager SDPA on meta would
otherwise take the math path and count the [B, H, L, L] score matrix that flash attention never
makes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class ActivationPeak:
    peak_bytes: int  # most bytes alive at once, beyond what existed before the forward
    output_bytes: int  # bytes still alive when the forward returned (its outputs)


class _LiveBytes(TorchDispatchMode):
    def __init__(self, existing: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        # Storages alive before the forward (weights, inputs) are never counted, even when an op returns
        # an alias of one that is not a view (the storage object is kept alive by its tensor, so ids hold).
        self._seen: set[int] = {id(t.untyped_storage()) for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t._is_view():
            return  # shares its base's storage: no new memory
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen or storage.nbytes() == 0:
            return  # a view of a storage already counted (or of an input)
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the GPU's fused kernels allocate: flash attention without a mask, memory-efficient with one."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)  # the kernel's additive form
    mask = attn_mask.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, False, dropout_p, is_causal,
                                                                  scale=scale)[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def trace_peak(run: Callable[[], Any], existing: tuple[torch.Tensor, ...] = ()) -> ActivationPeak:
    """The activation peak of `run()` (a forward on meta tensors), attention counted as fused kernels.

    `existing`: tensors alive before (the module's parameters and buffers, the inputs), never counted.
    """
    tracker = _LiveBytes(existing)
    with torch.no_grad(), fused_attention(), tracker:
        out = run()
    peak = tracker.peak
    output = sum(t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
    del out
    return ActivationPeak(peak, output)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once): what the module holds on its device."""
    seen: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        s = t.untyped_storage()
        seen[id(s)] = s.nbytes()
    return sum(seen.values())
