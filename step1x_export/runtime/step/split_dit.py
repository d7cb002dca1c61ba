"""The DiT step in pieces, for step caching: prepare -> (first block) -> the rest of the blocks -> final layer.

One process runs `LocalDiT` over the reference model's own methods; the parallel DiT
(`parallel.dit.ParallelDiT`) offers the same pieces over its shard of the batch and the sequence,
so one caching step serves both. Composed in order, the pieces are exactly the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ...step1x_ref.dit.model import Step1XEdit


@dataclass
class Hidden:
    """The DiT's state between blocks: image and text tokens, the modulation vector, the RoPE table."""

    img: Tensor
    txt: Tensor
    vec: Tensor
    pe: Tensor

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.img, self.txt, self.vec, self.pe


class SplitDiT(Protocol):
    model: Step1XEdit

    def prepare(self, img: Tensor, pe: Tensor, timestep: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
                *text: Tensor) -> Hidden:
        """Connector (v1.2: and its text-token mapping over `text` = text_embeds, text_mask) and embeddings
        (this rank's shard, when parallel)."""
        ...

    def first_block(self, h: Hidden) -> Hidden:
        ...

    def rest(self, h: Hidden, start: int) -> Tensor:
        """Double blocks from `start`, then the single blocks -> image tokens."""
        ...

    def finish(self, img: Tensor, vec: Tensor) -> Tensor:
        """Final layer -> the whole prediction [2, 2N, 64] (gathered from every rank, when parallel)."""
        ...

    def total(self, x: Tensor) -> Tensor:
        """Sum of a small tensor over every rank that holds a piece of the batch (itself in one process)."""
        ...

    def from_leader(self, x: Tensor) -> Tensor:
        """Rank 0's value of a small tensor, on every rank (itself in one process)."""
        ...


class LocalDiT:
    """The reference model's pieces, in one process."""

    def __init__(self, model: Step1XEdit):
        self.model = model

    def prepare(self, img: Tensor, pe: Tensor, timestep: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
                *text: Tensor) -> Hidden:
        txt, y = self.model.condition(llm_embedding, timestep, llm_mask, *text)
        img, txt, vec = self.model.embed(img, txt, y, timestep)
        return Hidden(img, txt, vec, pe)

    def first_block(self, h: Hidden) -> Hidden:
        img, txt = self.model.double_blocks[0](img=h.img, txt=h.txt, vec=h.vec, pe=h.pe)
        return Hidden(img, txt, h.vec, h.pe)

    def rest(self, h: Hidden, start: int) -> Tensor:
        return self.model.blocks(h.img, h.txt, h.vec, h.pe, start=start)

    def finish(self, img: Tensor, vec: Tensor) -> Tensor:
        return self.model.final_layer(img, vec)

    def total(self, x: Tensor) -> Tensor:
        return x

    def from_leader(self, x: Tensor) -> Tensor:
        return x


def split_dit(module: torch.nn.Module) -> SplitDiT:
    """The pieces of a torch DiT engine's module: the parallel DiT is its own; the reference model is wrapped."""
    if isinstance(module, Step1XEdit):
        return LocalDiT(module)
    if hasattr(module, "prepare") and hasattr(module, "rest"):
        return module  # type: ignore[return-value]
    raise ValueError(f"step caching needs the torch DiT (Step1XEdit or its parallel wrapper), "
                     f"got {type(module).__name__}")
