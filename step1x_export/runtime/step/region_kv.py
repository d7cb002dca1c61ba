"""Call-scoped attention over cached keys and values: RegionE's region-instruction KV cache, over the reference
model's own blocks (their maths untouched).

`KVWindow` is the RoPE table `pe` handed to one block's call, carrying that block's key/value cache: a tensor
subclass whose `__torch_function__` sees only the operations that read the table (the block's RoPE, whose
results carry the window on) and the `scaled_dot_product_attention` they feed, the way torch's own
`CausalBias` takes over the attention it is passed to. The call's rotated keys and its values are written into
the cache `k`, `v` [B, H, L_all, D] at `rows` (the positions of its tokens in the full sequence) and the
attention runs over the whole cache; its queries stay its own. A full step records: its cache is new and its
rows are every position, so it attends to exactly its own keys and values (the same numbers as without the
window) and leaves them in the cache. A region step (its tokens: the text and the edited ones) refreshes its
rows and attends to the rest as cached.

Only the table's RoPE operations and the attention, 15 per block, pass through Python; a `TorchFunctionMode`
around the block would see each of its hundred-odd operations (about a tenth of an eager region step on the
toy: docs/acceleration.md, "Region step cost"). The window is an argument of the call, nothing outside it
changes, and torch.compile traces the subclass into the block's graph: one graph serves every block of a type,
recording or not, every edit and every edited-token count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_SDPA = torch.nn.functional.scaled_dot_product_attention
_NOWRAP = torch.overrides.get_default_nowrap_functions()  # attribute reads (`_base`, ...) return plain tensors


class KVWindow(Tensor):
    """A block's `pe` whose attention writes its keys and values into `k`, `v` at `rows`, then attends to all
    of them. Build it with `KVWindow.of(pe, k, v, rows)`."""

    window: tuple[Tensor, Tensor, Tensor]

    @classmethod
    def of(cls, pe: Tensor, k: Tensor, v: Tensor, rows: Tensor) -> KVWindow:
        out = pe.as_subclass(cls)
        out.window = (k, v, rows)
        return out

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        window = next(a.window for a in args if isinstance(a, KVWindow))
        with torch._C.DisableTorchFunctionSubclass():
            if func is _SDPA:
                q, k, v, *rest = args
                cache_k, cache_v, rows = window
                cache_k.index_copy_(2, rows, k)
                cache_v.index_copy_(2, rows, v)
                return func(q, cache_k, cache_v, *rest, **kwargs)
            out = func(*args, **kwargs)
        return cls.of(out, *window) if type(out) is Tensor and func not in _NOWRAP else out
