"""The DiT engine as the denoising loop's step function.

The conditioning (pe, llm_embedding, llm_mask) is an explicit argument, never closed over, so the
same `guided_euler(engine_step_fn(dit))` can be captured in a CUDA graph once and replayed for every
later edit of that shape (`sampling.denoise` passes this edit's tensors in).
"""

from __future__ import annotations

from torch import Tensor

from ...step1x_ref.sampling import StepFn
from ..engines.engine import Engine


def engine_step_fn(dit: Engine) -> StepFn:
    """(img [2, 2N, 64], t [2], *conditioning) -> pred float32, for `guided_euler`; the conditioning is the
    dit spec's other inputs in spec order (pe, llm_embedding, llm_mask; v1.2 adds text_embeds, text_mask)."""
    names = [n for n in dit.spec.input_names if n not in ("img", "timestep")]

    def step(img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        return dit(img=img, timestep=t, **dict(zip(names, conditioning, strict=True)))["pred"].float()

    return step
