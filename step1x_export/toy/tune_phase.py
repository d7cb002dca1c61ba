"""The toy's fine-tune: the first phase's DiT trained on, with every task again plus the local task (red
things to green) and unknown instructions answered with the unchanged picture, on fresh images of every shape
(some faded towards grey). Its data come from their own seeded generators, so the first phase is untouched and a
run that starts from the first phase's saved weights gives the same bits as one from scratch."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from ..step1x_ref.vae.autoencoder import AutoEncoder
from .data import TRAIN_PHOTOS, fade_some, image_batch, paint_some, photo_tensors
from .dit_phase import embed_instructions, mllm_images, shape_latents, train_dit, tune_run
from .plan import TrainPlan, training_shapes
from .tasks import GLOBAL_TASKS, LOCAL_TASKS, UNKNOWN_TRAINING, Task

TUNE_TASKS: tuple[Task, ...] = GLOBAL_TASKS + LOCAL_TASKS + (UNKNOWN_TRAINING,)


def tune_pools(plan: TrainPlan) -> list[Tensor]:
    """Fresh training images at every shape (the first phase's count), `plan.tune_red_share` of them given red
    things, then `plan.tune_faded_share` of them faded."""
    gen = torch.Generator().manual_seed(plan.seed + 40)
    photos = photo_tensors(TRAIN_PHOTOS, max_short_side=320)
    pools = [image_batch(photos, plan.pool_per_shape, w, h, gen, plan.drawn_share) for w, h in training_shapes(plan)]
    return [fade_some(paint_some(pool, plan.tune_red_share, gen), plan.tune_faded_share, gen) for pool in pools]


def fine_tune(model: Step1XEdit, ae: AutoEncoder, embedder: Qwen25VLEmbedder, plan: TrainPlan, log) -> None:
    """Train `model` (the first phase's weights) on; it ends holding the fine-tune's EMA weights."""
    if plan.tune_steps == 0:
        return
    t0 = time.perf_counter()
    pools = tune_pools(plan)
    emb, mask, prompt_task = embed_instructions(embedder, mllm_images(pools, plan.mllm_views), TUNE_TASKS)
    data = shape_latents(model, ae, pools, emb.shape[2], TUNE_TASKS)
    log(f"fine-tune: {len(TUNE_TASKS)} tasks, {len(prompt_task)} instructions embedded, "
        f"{sum(p.shape[0] for p in pools)} images, in {time.perf_counter() - t0:.0f} s")
    ema = train_dit(model, data, emb, mask, prompt_task, TUNE_TASKS, tune_run(plan), plan, log)
    model.load_state_dict(ema.module.state_dict())
