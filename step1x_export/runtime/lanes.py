"""The stages around the denoising loop, per edit: preprocess, MLLM and VAE encode into a lane; VAE decode
and postprocess out of it. `Step1XEditRuntime.edit` runs them for one edit, `edit_batch` for a batch whose
lanes join and leave the one loop at step boundaries.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..specs import shape_bucket
from ..step1x_ref.edit_v1p2 import branch_conditioning, postprocess_v1p2, prepare_image_v1p2
from ..step1x_ref.imaging import edit_size
from ..step1x_ref.pipeline import EditImage, negative_prompt_for, postprocess, prepare_input, sampling_inputs
from ..step1x_ref.sampling import Lane, unpack
from ..timing import StageTimer
from ..validate import InputError, check_edit_numbers, check_finite
from .batching import BatchKey, EditJob, EditOutcome, LaneState
from .progress import StepEvents

if TYPE_CHECKING:
    from ..step1x_ref.configs import ModelConfig
    from .options import RuntimeOptions
    from .stages import Stages


class EditLanes:
    """`Step1XEditRuntime`'s per-edit stages around the loop (a mixin: the runtime supplies the attributes)."""

    config: ModelConfig
    options: RuntimeOptions
    device: torch.device
    stages: Stages | None
    last_latent: torch.Tensor | None
    _edits: int
    default_size_level: int
    _stage: Callable[[StageTimer, str, str], AbstractContextManager[Any]]
    _reference: Callable[[StageTimer, EditImage], torch.Tensor]
    check_shapes: Callable[..., None]

    def batch_key(self, image: Image.Image, size_level: int | None = None) -> BatchKey:
        """The size an edit of `image` runs at: edits batch only with others of the same key."""
        size_level = self.default_size_level if size_level is None else size_level
        if self.options.shape_buckets and self.config.reason_edit is None:
            return shape_bucket(*image.size, size_level)
        return edit_size(*image.size, size_level)

    def prepare_lane(self, job: EditJob, *, width: int | None = None, height: int | None = None,
                     timer: StageTimer | None = None) -> Lane:
        """Checks, preprocess, MLLM, VAE encode and the sampling inputs of one edit: a lane for the loop."""
        size_level = self.default_size_level if job.size_level is None else job.size_level
        steps = self.config.default_steps if job.steps is None else job.steps
        cfg = self.config.default_cfg if job.cfg is None else job.cfg
        v12 = self.config.reason_edit is not None
        check_edit_numbers(steps=steps, cfg=cfg, size_level=size_level, seed=job.seed)
        for name, text in (("instruction", job.instruction), ("negative_prompt", job.negative_prompt)):
            if not isinstance(text, str) and not (name == "negative_prompt" and text is None):
                raise InputError(f"{name} must be a str, got {type(text).__name__}")
        if self.stages is None:
            raise RuntimeError("Step1XEditRuntime is closed")
        timer = timer or StageTimer(self.device)
        image = job.image
        with timer.stage("preprocess"):
            if v12 and image is None:
                raise InputError(f"{self.config.name}: text-to-image is not supported for v1.2")
            bucket = (shape_bucket(*image.size, size_level)
                      if self.options.shape_buckets and image is not None and not v12 else None)
            img = (EditImage(*prepare_image_v1p2(image, size_level)) if v12
                   else prepare_input(image, size_level, self.config, width, height, bucket))
            self.check_shapes(img.width, img.height, reference=img.has_reference)  # before any model work
        with self._stage(timer, "encoder", "mllm") as encoder:
            encoded = encoder([job.instruction, negative_prompt_for(img, job.negative_prompt)], img.mllm_image)
            for text in encoded if v12 else encoded[:1]:
                check_finite("the MLLM encoder (text embedding)", text.embedding if v12 else text)
        ref = self._reference(timer, img)
        txt_len = 1 if v12 else encoded[0].shape[1]  # v1.2's per-branch pe comes with its conditioning
        noise, pe, timesteps = sampling_inputs(self.config, txt_len, img.width, img.height, seed=job.seed,
                                               steps=steps, reference=img.has_reference)
        conditioning = branch_conditioning(self.config, encoded, img.width, img.height) if v12 else (pe, *encoded)
        noise, *conditioning = (t.to(self.device) for t in (noise, *conditioning))
        lane = Lane.of(noise, ref, timesteps, guidance=cfg, truncate=self.config.cfg_truncate,
                       conditioning=tuple(conditioning), tag=LaneState(job, img, timer, v12))
        self._start_steps(lane)  # it joins the loop next
        return lane

    @staticmethod
    def lane_key(lane: Lane) -> BatchKey:
        state: LaneState = lane.tag  # type: ignore[assignment]
        return state.img.width, state.img.height

    def finish_lanes(self, lanes: list[Lane]) -> list[EditOutcome]:
        """VAE decode and postprocess of the lanes that left the loop: each edit's outcome."""
        outcomes, good = [], []
        for lane in lanes:
            state: LaneState = lane.tag  # type: ignore[assignment]
            outcome = EditOutcome(state.job, error=lane.error, batch_sizes=lane.batch_sizes)
            if state.events is not None:
                outcome.step_seconds = state.events.step_seconds()
            if state.clock is not None:
                outcome.dit_seconds = state.clock.seconds(state.first_call, len(lane.batch_sizes))
            if outcome.error is None:
                try:
                    check_finite("denoising (final latent)", lane.x)
                    outcome.latent = self.last_latent = lane.x
                    good.append((lane, outcome))
                except Exception as e:
                    outcome.error = e
            outcomes.append(outcome)
        if good:
            self._decode(good)
        for lane, outcome in zip(lanes, outcomes, strict=True):
            timings = lane.tag.timer.resolve()  # type: ignore[union-attr]
            outcome.timings = {**timings, **outcome.timings}
            outcome.timings.setdefault("denoise", sum(outcome.step_seconds))  # batched: join to leave
        return outcomes

    def _decode(self, finished: list[tuple[Lane, EditOutcome]]) -> None:
        """VAE decode and postprocess, one edit per decoder call: the very call its edit alone makes, so each
        answer is bit for bit its edit alone (a batched call's convolutions may pick other kernels, and shared,
        a call of 4 saved ~1-10% of a decode here, well under 1% of an edit)."""
        for lane, outcome in finished:
            state: LaneState = lane.tag  # type: ignore[assignment]
            try:
                with self._stage(state.timer, "vae_decoder", "vae_decode") as vae_decoder:
                    pixels = vae_decoder(latent=unpack(lane.x.float(), state.img.height, state.img.width))["image"]
                check_finite("the VAE decoder (image)", pixels)
                with state.timer.stage("postprocess"):
                    outcome.image = (postprocess_v1p2 if state.v12 else postprocess)(pixels, state.img.orig_size)
                self._edits += 1
            except Exception as e:
                outcome.error = e

    def _start_steps(self, lane: Lane) -> None:
        """The lane's step events start now (the bar follows finished steps, not queued ones)."""
        state: LaneState = lane.tag  # type: ignore[assignment]
        state.events = StepEvents(self.device, state.job.progress)
        lane.progress = state.events

