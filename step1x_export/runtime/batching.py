"""Batched edits with step-level joining: several same-size edits share each DiT call (batch 2B with CFG).

An edit joins the running batch at the next step boundary, after its own preprocessing, MLLM and VAE
encoding, and leaves when its own schedule ends; each keeps its seed, steps, guidance and truncation
(`sampling.denoise_lanes`, the one denoising loop). Requests are only batched with their own edit size:
the RoPE table and every token count are the size's, so the DiT sees one shape per batch. With CUDA graphs
the batch is padded to a power of two, so one graph per (size, batch bucket) serves nearby batch sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # importing this module (the server's queue does) loads neither torch nor PIL
    import torch
    from PIL import Image
    from torch import Tensor

    from ..step1x_ref.pipeline import EditImage
    from ..step1x_ref.sampling import Lane, ProgressFn, UpdateFn
    from ..step1x_ref.versions import EditVersion
    from ..timing import StageTimer
    from .options import RuntimeOptions
    from .telemetry.progress import StepEvents

LatentFn = Callable[["Tensor"], None]  # an edit's noisy tokens after a step: read them, never keep or change them
BatchKey = tuple[int, int]  # the edit's (width, height) at its size level: edits batch only with their own key


@dataclass
class EditJob:
    """One edit of a batch: `Step1XEditRuntime.edit`'s arguments, and the caller's handle (`tag`)."""

    image: Image.Image
    instruction: str
    seed: int = 0
    steps: int | None = None
    cfg: float | None = None  # None: the model's (ModelConfig.default_cfg)
    size_level: int | None = None
    negative_prompt: str | None = None
    progress: ProgressFn | None = None  # called after each of this edit's steps; raising stops this edit only
    latents: LatentFn | None = None  # called with its tokens [1, N, 64] after each step (live previews)
    tag: object = None


@dataclass
class EditOutcome:
    """A finished (or failed) edit of a batch: its image, or the exception that stopped it."""

    job: EditJob
    image: Image.Image | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; denoise = join to leave
    step_seconds: list[float] = field(default_factory=list)  # each of its steps, the work between them included
    batch_sizes: list[int] = field(default_factory=list)  # edits sharing each of its steps
    dit_seconds: list[float] = field(default_factory=list)  # each of its DiT calls alone (device time on CUDA)
    latent: Tensor | None = None  # its denoised tokens before decoding (fidelity checks)


JoinFn = Callable[[int, BatchKey], Sequence[EditJob]]  # (free places, the batch's key) -> edits joining now
DoneFn = Callable[[EditOutcome], None]


def graph_bucket(batch: int) -> int:
    """The batch size a CUDA graph is captured for: the next power of two (1, 2, 4, 8, ...)."""
    return 1 << (batch - 1).bit_length()


@dataclass
class LaneState:
    """The runtime's side of one lane: what it needs to finish the edit after the loop."""

    job: EditJob
    img: EditImage
    timer: StageTimer
    events: StepEvents | None = None  # its steps' ends (device events on CUDA), started when it joins
    clock: DiTClock | None = None  # the batch's DiT calls, and the first this lane took part in
    first_call: int = 0


class DiTClock:
    """Times each DiT call of a batch alone (CUDA events around it on a GPU, the host clock on CPU), so the
    server's forecast sees the step's own cost, not the preparation and decoding done between steps."""

    def __init__(self, update: Callable[..., Tensor], cuda: bool):
        self.update, self.cuda = update, cuda
        self.marks: list[tuple[Any, Any]] = []

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, *args: Tensor) -> Tensor:
        start = self._mark()
        out = self.update(*args)
        self.marks.append((start, self._mark()))
        return out

    def seconds(self, first: int, count: int) -> list[float]:
        marks = self.marks[first : first + count]
        if self.cuda:
            for _, end in marks:
                end.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in marks]
        return [b - a for a, b in marks]


class BatchRunner(Protocol):
    """What the batch loop needs of a runtime (`Step1XEditRuntime` is one): declared here, so this module
    does not import the runtime that calls it."""

    options: RuntimeOptions
    version: EditVersion
    device: torch.device
    timings: dict[str, float]
    step_seconds: list[float]

    def prepare_lane(self, job: EditJob) -> Lane: ...
    def lane_key(self, lane: Lane) -> BatchKey: ...
    def finish_lanes(self, lanes: list[Lane]) -> list[EditOutcome]: ...
    def batch_update(self) -> UpdateFn: ...
    def batch_key(self, image: Image.Image, size_level: int | None = None) -> BatchKey: ...
    def edit(self, image: Image.Image | None, instruction: str, **options: Any) -> Image.Image: ...


def run_batch(runtime: BatchRunner, jobs: Sequence[EditJob], *, join: JoinFn | None, done: DoneFn | None,
              max_batch: int) -> list[EditOutcome]:
    """Run `jobs` (same key) as one batch, taking joiners from `join` at step boundaries; see `edit_batch`."""
    from ..step1x_ref.sampling import denoise_lanes

    outcomes: list[EditOutcome] = []
    running: dict[int, Lane] = {}  # by id: lanes handed to the loop, not yet delivered
    key: BatchKey | None = None

    def deliver(outcome: EditOutcome) -> None:
        outcomes.append(outcome)
        if done is not None:
            done(outcome)

    def start(job: EditJob) -> Lane | None:
        nonlocal key
        try:
            lane = runtime.prepare_lane(job)
            lane_key = runtime.lane_key(lane)
            if key is not None and lane_key != key:
                raise ValueError(f"an edit of size {lane_key} cannot join a batch of size {key}")
            key = lane_key
        except Exception as e:  # this request's mistake (or its stage's failure): the others go on
            deliver(EditOutcome(job, error=e))
            return None
        running[id(lane)] = lane
        lane.tag.clock, lane.tag.first_call = clock, len(clock.marks)  # type: ignore[union-attr]
        return lane

    def leave(lanes: list[Lane]) -> None:
        for lane in lanes:
            running.pop(id(lane), None)
        for outcome in runtime.finish_lanes(lanes):
            deliver(outcome)

    def joiners(room: int) -> list[Lane]:
        if join is None or key is None:
            return []
        return [lane for job in join(room, key) if (lane := start(job)) is not None]

    clock = DiTClock(runtime.batch_update(), runtime.device.type == "cuda")
    first = [lane for job in jobs if (lane := start(job)) is not None]
    if not first and join is None:
        return outcomes
    pad = graph_bucket if runtime.options.cuda_graphs else (lambda b: b)
    try:
        denoise_lanes(clock, first, join=joiners, leave=leave, max_batch=max_batch, pad_to=pad,
                      stack=runtime.version.stack)
    except Exception as e:  # the DiT itself failed: every edit still in the batch gets the error
        for lane in list(running.values()):
            running.pop(id(lane))
            deliver(EditOutcome(lane.tag.job, error=e))  # type: ignore[union-attr]
    return outcomes


def run_serially(runtime: BatchRunner, jobs: Sequence[EditJob], *, join: JoinFn | None,
                 done: DoneFn | None) -> list[EditOutcome]:
    """`edit_batch` with batches of one, through `edit`: for runtimes that cannot batch (see check_batching)."""
    outcomes: list[EditOutcome] = []
    line, key = list(jobs), None
    while line or join is not None:
        if not line:
            line = list(join(1, key)) if key is not None else []
            if not line:
                break
        job = line.pop(0)
        outcome = EditOutcome(job)
        try:
            key = runtime.batch_key(job.image, job.size_level)
            outcome.image = runtime.edit(job.image, job.instruction, seed=job.seed, steps=job.steps, cfg=job.cfg,
                                         size_level=job.size_level, negative_prompt=job.negative_prompt,
                                         progress=job.progress, latents=job.latents)
            outcome.timings, outcome.step_seconds = dict(runtime.timings), list(runtime.step_seconds)
            outcome.batch_sizes = [1] * len(outcome.step_seconds)
        except Exception as e:
            outcome.error = e
        outcomes.append(outcome)
        if done is not None:
            done(outcome)
    return outcomes
