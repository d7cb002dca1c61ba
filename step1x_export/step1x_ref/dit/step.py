"""The torch DiT as the denoising loop's step function over its conditioning, in the dit spec's order."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def torch_dit_step(model: torch.nn.Module, dtype: torch.dtype) -> Callable[..., Tensor]:
    """(img, t, pe, llm_embedding, llm_mask[, text_embeds, text_mask]) -> pred float32: the DiT in `dtype`
    (pe stays float32, masks integer); v1.2's two text-token inputs follow its three shared ones."""

    @torch.inference_mode()
    def step(img: Tensor, t: Tensor, pe: Tensor, emb: Tensor, mask: Tensor, *text: Tensor) -> Tensor:
        text_inputs = (text[0].to(dtype), *text[1:]) if text else ()
        return model(img.to(dtype), pe, t.to(dtype), emb.to(dtype), mask, *text_inputs).float()

    return step
