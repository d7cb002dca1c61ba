"""Call-scoped attention over cached keys and values: RegionE's region-instruction KV cache, over the reference
model's own blocks (their maths untouched).

`KVWindow` is a `TorchFunctionMode` entered around one block's call: it sees that block's one attention (the
`scaled_dot_product_attention` after RoPE) and nothing else changes. The call's own keys and values are
written into the cache `k`, `v` [B, H, L_all, D] at `rows` (the positions of its tokens in the full sequence)
and the attention runs over the whole cache; its queries stay its own. A full step records: its cache is
new and its rows are every position, so it attends to exactly its own keys and values (the same numbers as
without the mode) and leaves them in the cache. A region step (its tokens: the text and the edited ones)
refreshes its rows and attends to the rest as cached.

The mode holds tensors only (no block counter), so torch.compile traces it into a block's graph once and that
graph serves every block of a type, recording or not, every edit and every edited-token count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SDPA = torch.nn.functional.scaled_dot_product_attention


class KVWindow(TorchFunctionMode):
    """The attention under it writes its keys and values into `k`, `v` at `rows`, then attends to all of them."""

    def __init__(self, k: Tensor, v: Tensor, rows: Tensor) -> None:
        super().__init__()
        self.k, self.v, self.rows = k, v, rows

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func is _SDPA:
            q, k, v, *rest = args
            self.k.index_copy_(2, self.rows, k)
            self.v.index_copy_(2, self.rows, v)
            args = (q, self.k, self.v, *rest)
        return func(*args, **(kwargs or {}))
