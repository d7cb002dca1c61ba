"""Call-scoped attention over cached keys and values: RegionE's region-instruction KV cache, over the reference
model's own blocks (their maths untouched).

Each is a `TorchFunctionMode` entered around one block's call: it sees that block's one attention (the
`scaled_dot_product_attention` after RoPE) and nothing else changes. `KVRecord` keeps the keys and values a
full step's block attends to; `KVWindow` lets a region step's block (its queries: the text and the edited
tokens) attend to every token: the cached keys and values with this call's own rows written over them. The
mode holds tensors only (no counter), so torch.compile traces it into the block's graph once and the same
graph serves every block of a type, every edit and every edited-token count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SDPA = torch.nn.functional.scaled_dot_product_attention


class KVRecord(TorchFunctionMode):
    """Keeps `k`, `v` [B, H, L, D] (after norm and RoPE) of the attention run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func is _SDPA:
            self.k, self.v = args[1], args[2]
        return func(*args, **(kwargs or {}))


class KVWindow(TorchFunctionMode):
    """The attention under it attends to `k`, `v` [B, H, L_all, D] with its own keys and values written at
    `rows` [L_call] (the positions of its tokens in the full sequence); its queries stay its own."""

    def __init__(self, k: Tensor, v: Tensor, rows: Tensor) -> None:
        super().__init__()
        self.k, self.v, self.rows = k, v, rows

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func is _SDPA:
            q, k, v, *rest = args
            args = (q, self.k.index_copy(2, self.rows, k), self.v.index_copy(2, self.rows, v), *rest)
        return func(*args, **(kwargs or {}))
