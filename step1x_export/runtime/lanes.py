"""The stages around the denoising loop, per edit: the edit flow's preparation (preprocess, MLLM and VAE
encode) into a lane; the flow's finish (VAE decode, the version's postprocess) out of it.
`Step1XEditRuntime.edit` runs them for one edit, `edit_batch` for a batch whose lanes join and leave the one
loop at step boundaries.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..specs import shape_bucket
from ..step1x_ref.imaging import edit_size
from ..step1x_ref.sampling import Lane, pack, unpack
from ..timing import StageTimer
from ..validate import InputError, check_finite
from .batching import BatchKey, EditJob, EditOutcome, LaneState
from .telemetry.progress import LatentTap, StepEvents

if TYPE_CHECKING:
    from ..step1x_ref.configs import ModelConfig
    from ..step1x_ref.flow import EditFlow
    from ..step1x_ref.versions import EditVersion
    from .options import RuntimeOptions
    from .stages import Stages


class EditLanes:
    """`Step1XEditRuntime`'s per-edit stages around the loop (a mixin: the runtime supplies the attributes)."""

    config: ModelConfig
    flow: EditFlow
    version: EditVersion
    options: RuntimeOptions
    device: torch.device
    stages: Stages | None
    last_latent: torch.Tensor | None
    _edits: int
    default_size_level: int
    _stage: Callable[[StageTimer, str, str], AbstractContextManager[Any]]
    check_shapes: Callable[..., None]

    def batch_key(self, image: Image.Image, size_level: int | None = None) -> BatchKey:
        """The size an edit of `image` runs at: edits batch only with others of the same key."""
        size_level = self.default_size_level if size_level is None else size_level
        return self._bucket(image, size_level) or edit_size(*image.size, size_level)

    def _bucket(self, image: Image.Image | None, size_level: int) -> BatchKey | None:
        """The aspect bucket (width, height) an edit of `image` snaps to, or None where it keeps its own."""
        if image is None or not (self.options.shape_buckets and self.version.shape_buckets):
            return None
        return shape_bucket(*image.size, size_level)

    def prepare_lane(self, job: EditJob, *, width: int | None = None, height: int | None = None,
                     timer: StageTimer | None = None) -> Lane:
        """Checks, then the edit flow's preparation (preprocess, MLLM, VAE encode, sampling inputs): a lane."""
        steps, cfg, size_level = self.flow.settle(seed=job.seed, steps=job.steps, cfg=job.cfg,
                                                  size_level=job.size_level)
        for name, text in (("instruction", job.instruction), ("negative_prompt", job.negative_prompt)):
            if not isinstance(text, str) and not (name == "negative_prompt" and text is None):
                raise InputError(f"{name} must be a str, got {type(text).__name__}")
        if self.stages is None:
            raise RuntimeError("Step1XEditRuntime is closed")
        timer = timer or StageTimer(self.device)
        bucket = self._bucket(job.image, size_level)
        img, inputs = self.flow.prepare_inputs(
            EngineStages(self, timer), timer, job.image, job.instruction, seed=job.seed, steps=steps,
            size_level=size_level, device=self.device, negative_prompt=job.negative_prompt, width=width,
            height=height, bucket=bucket,  # the engines' profiles checked before any model work:
            check=lambda img: self.check_shapes(img.width, img.height, reference=img.has_reference),
        )
        lane = Lane.of(inputs.noise, inputs.ref, inputs.timesteps, guidance=cfg, truncate=self.config.cfg_truncate,
                       conditioning=inputs.conditioning, tag=LaneState(job, img, timer))
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
                outcome.image = self.flow.finish(EngineStages(self, state.timer), state.timer, lane.x,
                                                 state.img.height, state.img.width, state.img.orig_size)
                self._edits += 1
            except Exception as e:
                outcome.error = e

    def _start_steps(self, lane: Lane) -> None:
        """The lane's step events start now (the bar follows finished steps, not queued ones)."""
        state: LaneState = lane.tag  # type: ignore[assignment]
        state.events = StepEvents(self.device, state.job.progress)
        lane.progress = state.events if state.job.latents is None else LatentTap(state.events, lane, state.job.latents)



class EngineStages:
    """The runtime's engines as the edit flow's stages of one edit: each loaded (and, with sequential loading,
    freed) in turn and timed on the edit's timer. The loop runs apart, over lanes (`Step1XEditRuntime.edit`,
    `edit_batch`)."""

    def __init__(self, lanes: EditLanes, timer: StageTimer):
        self.lanes, self.timer = lanes, timer

    def encode_text(self, texts: list[str], image: Image.Image) -> Any:
        with self.lanes._stage(self.timer, "encoder", "mllm") as encoder:
            return encoder(texts, image)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.lanes._stage(self.timer, "vae_encoder", "vae_encode") as vae_encoder:
            return pack(vae_encoder(image=pixels)["latent"].float())

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        with self.lanes._stage(self.timer, "vae_decoder", "vae_decode") as vae_decoder:
            return vae_decoder(latent=unpack(tokens, height, width))["image"]
