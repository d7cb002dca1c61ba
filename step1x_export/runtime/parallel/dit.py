"""The DiT across ranks: another torch engine module with the reference model's forward signature.

Each rank runs its CFG branch (cfg 2: cond on one, uncond on the other) on its chunk of the text
tokens and of the image tokens (with the matching rows of the RoPE table); attention is the only
place where chunks meet (`attention.py`). The prediction is gathered back in order on every rank,
so the denoising loop (CFG combine, Euler) runs identically everywhere. Weights are replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from ...step1x_ref.dit.model import Step1XEdit
from ...step1x_ref.versions.v1p2_joint import bucket_length, pad_text
from ..step.split_dit import Hidden
from .attention import sequence_parallel
from .layout import ParallelDegrees, ParallelGroups, init_groups

# torch 2.13 renamed all_gather_tensor (older releases, such as GPU machines' 2.11, have only that name)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class ParallelDiT(nn.Module):
    def __init__(self, model: Step1XEdit, groups: ParallelGroups):
        super().__init__()
        groups.degrees.check_model(model.params.num_heads)
        self.model, self.groups = model, groups
        self.degrees = groups.degrees

    def forward(self, img: Tensor, pe: Tensor, timestep: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
                *text: Tensor) -> Tensor:
        h = self.prepare(img, pe, timestep, llm_embedding, llm_mask, *text)
        return self.finish(self.rest(h, 0), h.vec)

    # -- the pieces step caching composes (split_dit.SplitDiT) ------------------------------------------------
    def prepare(self, img: Tensor, pe: Tensor, timestep: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
                *text: Tensor) -> Hidden:
        img, timestep, llm_embedding, llm_mask, *text = (
            self._branch(x) for x in (img, timestep, llm_embedding, llm_mask, *text))
        if pe.shape[0] > 1:  # v1.2's one call: a RoPE table per branch
            pe = self._branch(pe)
        if text:  # v1.2: this rank's branch at its own text length, the very call it makes alone
            pe, llm_embedding, llm_mask, text = trim_text(pe, llm_embedding, llm_mask, text)
            if self.degrees.ring > 1:  # the ring takes equal chunks: pad the text, its keys biased out
                length = bucket_length(llm_embedding.shape[1], self.degrees.sequence)
                pe, llm_embedding, llm_mask, *text = pad_text((pe, llm_embedding, llm_mask, *text), length)
        txt, y = self.model.condition(llm_embedding, timestep, llm_mask, *text)
        img, txt, vec = self.model.embed(img, txt, y, timestep)
        n_txt = txt.shape[1]
        self.degrees.check_tokens(n_txt, img.shape[1])
        pe = torch.cat([self._text_chunk(pe[:, :, :n_txt], 2), self._chunk(pe[:, :, n_txt:], 2)], dim=2)
        return Hidden(self._chunk(img, 1), self._text_chunk(txt, 1), vec, pe)

    def first_block(self, h: Hidden) -> Hidden:
        with sequence_parallel(self.groups, self._counts(h), self._key_bias(h)):
            img, txt = self.model.double_blocks[0](img=h.img, txt=h.txt, vec=h.vec, pe=h.pe)
        return Hidden(img, txt, h.vec, h.pe)

    def rest(self, h: Hidden, start: int) -> Tensor:
        with sequence_parallel(self.groups, self._counts(h), self._key_bias(h)):
            return self.model.blocks(h.img, h.txt, h.vec, h.pe, start=start)

    def finish(self, img: Tensor, vec: Tensor) -> Tensor:
        pred = self.model.final_layer(img, vec)
        d = self.degrees
        for dim, axis, degree in (("ulysses", 1, d.ulysses), ("ring", 1, d.ring), ("cfg", 0, d.cfg)):
            if degree > 1:  # innermost first, so the chunks come back in sequence order
                pred = _all_gather(pred, axis, self.groups.group(dim))
        return pred

    def total(self, x: Tensor) -> Tensor:
        return funcol.all_reduce(x, "sum", dist.group.WORLD)

    def from_leader(self, x: Tensor) -> Tensor:
        return funcol.broadcast(x, 0, dist.group.WORLD)

    # -- sharding ----------------------------------------------------------------------------------------------
    def _branch(self, x: Tensor) -> Tensor:
        """This rank's CFG rows of a [2, ...] input (both rows when cfg is not split)."""
        return x.chunk(self.degrees.cfg, dim=0)[self.groups.cfg_rank]

    def _chunk(self, x: Tensor, dim: int) -> Tensor:
        return x.chunk(self.degrees.sequence, dim=dim)[self.groups.sequence_rank]

    def _text_chunk(self, x: Tensor, dim: int) -> Tensor:
        """My chunk of the text tokens: equal chunks, or (Ulysses alone, where the length does not divide: v1.2's
        per-edit text) chunks one token apart, which the all-to-all takes by their lengths."""
        if self.degrees.ring > 1 or x.shape[dim] % self.degrees.sequence == 0:
            return self._chunk(x, dim)
        return x.tensor_split(self.degrees.sequence, dim=dim)[self.groups.sequence_rank]

    def _key_bias(self, h: Hidden) -> Tensor | None:
        """My tokens' key bias for the ring (0, or -inf for padded text: its RoPE rows are zero, a rotation's
        never are), or None where no rank holds padding (every rank of the ring must agree: the K chunks they
        pass on have one shape)."""
        if self.degrees.ring == 1:
            return None
        padded = h.pe[0, 0].flatten(1).abs().amax(1) == 0
        anywhere = funcol.all_reduce(padded.any().float()[None], "max", self.groups.group("ring"))
        if not bool(anywhere.item()):
            return None
        return torch.zeros(padded.shape, device=padded.device).masked_fill(padded, float("-inf"))

    def _counts(self, h: Hidden) -> list[int] | None:
        """Every Ulysses rank's token count where the text does not divide evenly (None: equal chunks)."""
        if self.degrees.ulysses == 1 or self.degrees.ring > 1:
            return None
        mine = torch.tensor([h.txt.shape[1] + h.img.shape[1]], device=h.img.device)
        return [int(n) for n in _all_gather(mine, 0, self.groups.group("ulysses")).tolist()]


def trim_text(pe: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
              text: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """One v1.2 branch [1, ...] without the padding its one CFG call added: its real text tokens come first."""
    if llm_embedding.shape[0] != 1:
        raise ValueError("v1.2 splits across ranks one CFG branch per rank (cfg_degree 2): its branches' texts "
                         "differ in length")
    padded, length = llm_mask.shape[1], int(llm_mask.sum())
    if length == padded:
        return pe, llm_embedding, llm_mask, text
    pe = torch.cat([pe[:, :, :length], pe[:, :, padded:]], dim=2)
    return pe, llm_embedding[:, :length], llm_mask[:, :length], [t[:, :length] for t in text]


def parallel_dit(model: Step1XEdit | nn.Module, degrees: ParallelDegrees) -> nn.Module:
    """`model` itself in one process; else the parallel wrapper over it (joining torchrun's group)."""
    if degrees.world == 1:
        return model
    return ParallelDiT(model, init_groups(degrees, next(model.parameters()).device))  # type: ignore[arg-type]
