"""The DiT engine as the denoising loop's step function.

The conditioning (pe, llm_embedding, llm_mask) is an explicit argument, never closed over, so the
same `guided_euler(engine_step_fn(dit))` can be captured in a CUDA graph once and replayed for every
later edit of that shape (`sampling.denoise` passes this edit's tensors in).
"""

from __future__ import annotations

from torch import Tensor

from ..step1x_ref.sampling import StepFn
from .engine import Engine


def engine_step_fn(dit: Engine) -> StepFn:
    """(img [2, 2N, 64], t [2], pe, llm_embedding, llm_mask) -> pred float32, for `guided_euler`."""

    def step(img: Tensor, t: Tensor, pe: Tensor, llm_embedding: Tensor, llm_mask: Tensor) -> Tensor:
        return dit(img=img, pe=pe, timestep=t, llm_embedding=llm_embedding, llm_mask=llm_mask)["pred"].float()

    return step
