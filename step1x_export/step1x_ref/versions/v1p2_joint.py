"""v1.2's two CFG branches in one DiT call: each branch's text padded to a common bucket length, the padded
keys masked out of every joint attention.

The published pipeline calls the DiT once per branch, each at its own (trimmed) text length, with unmasked
attention. One batch-2 call computes the same function when the padded text tokens cannot reach a real
token: the connector already masks them (its refiner's attention and its pooled mean read `llm_mask`), the
text-token mapping is multiplied by `text_mask`, and the DiT's joint attention gets a key mask here
(`KeyPaddingMask`, scoped to the call). A padded token's own rows are computed and never read: the final
layer sees image tokens only. What differs is rounding only: a batch-2 GEMM, a masked softmax and a longer
masked sum may round differently from the batch-1, unmasked, shorter ones (`tests/test_v1p2_speed.py`
bounds it against float64).

Text lengths are rounded up to a multiple of a bucket, so a CUDA graph per bucket serves every prompt whose
length falls in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..sampling import StepFn

# The joint conditioning, in the dit spec's order: every tensor's leading dimension is the CFG branch.
JOINT_INPUTS = ("pe", "llm_embedding", "llm_mask", "text_embeds", "text_mask")


def bucket_length(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` tokens."""
    if bucket < 1:
        raise ValueError(f"text bucket must be >= 1 token, got {bucket}")
    return -(-length // bucket) * bucket


def pad_text(inputs: Sequence[Tensor], length: int) -> tuple[Tensor, ...]:
    """One branch's (pe, llm_embedding, llm_mask, text_embeds, text_mask) with its text padded to `length`
    tokens: zeros, masked (the RoPE table's padded rows zero too: finite, and never a key)."""
    pe, emb, mask, text_embeds, text_mask = inputs
    extra = length - emb.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a text of {emb.shape[1]} tokens to {length}")
    if extra == 0:
        return tuple(inputs)
    txt = emb.shape[1]
    pe = torch.cat([pe[:, :, :txt], pe.new_zeros(*pe.shape[:2], extra, *pe.shape[3:]), pe[:, :, txt:]], dim=2)
    return (pe, F.pad(emb, (0, 0, 0, extra)), F.pad(mask, (0, extra)), F.pad(text_embeds, (0, 0, 0, extra)),
            F.pad(text_mask, (0, extra)))


def joint_conditioning(branches: Sequence[Sequence[Tensor]], bucket: int) -> tuple[Tensor, ...]:
    """The branches' inputs (cond, uncond; each batch 1) as one batch-2 conditioning, texts padded to the
    bucket of the longer one."""
    length = bucket_length(max(b[1].shape[1] for b in branches), bucket)
    padded = [pad_text(b, length) for b in branches]
    return tuple(torch.cat(parts) for parts in zip(*padded, strict=True))


def stack_joint(rows: Sequence[Sequence[Tensor]]) -> tuple[Tensor, ...]:
    """Several edits' joint conditionings (each [2, ...], its own bucket) as one batch: padded to the longest."""
    length = max(r[1].shape[1] for r in rows)
    padded = [pad_text(r, length) for r in rows]
    return tuple(torch.cat(parts) for parts in zip(*padded, strict=True))


class KeyPaddingMask(TorchFunctionMode):
    """Every unmasked `scaled_dot_product_attention` over the joint sequence (as many keys as `keys` has
    columns) gets `keys` [B, S] (True: a real token) as its key mask. Attention that carries its own mask (the
    connector's) or runs over another length is left alone. Thread-local and gone when the `with` ends."""

    def __init__(self, keys: Tensor):
        super().__init__()
        self.mask = keys[:, None, None, :]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and kwargs.get("attn_mask") is None:
            k = args[1]
            if k.shape[-2] == self.mask.shape[-1] and k.shape[0] == self.mask.shape[0]:
                kwargs = {**kwargs, "attn_mask": self.mask}
        return func(*args, **kwargs)


def key_mask(llm_mask: Tensor, image_tokens: int) -> Tensor:
    """[B, L + image_tokens] bool: the real text tokens, then every image token."""
    image = torch.ones(llm_mask.shape[0], image_tokens, dtype=torch.bool, device=llm_mask.device)
    return torch.cat([llm_mask.bool(), image], dim=1)


def masked_step(step_fn: StepFn) -> StepFn:
    """A step over (img [2B, 2N, 64], t [2B], *joint conditioning) whose DiT attention masks the padded text."""

    def step(img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        if len(conditioning) != len(JOINT_INPUTS):
            raise ValueError(f"joint step: expected {len(JOINT_INPUTS)} conditioning tensors, got {len(conditioning)}")
        with KeyPaddingMask(key_mask(conditioning[2], img.shape[1])):
            return step_fn(img, t, *conditioning)

    return step
