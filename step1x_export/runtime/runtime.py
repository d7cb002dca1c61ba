"""`Step1XEditRuntime`: the embeddable edit API over torch, ONNX Runtime or TensorRT engines.

preprocess -> MLLM (cond + uncond, one vision pass) -> VAE encode -> denoising loop -> VAE decode ->
postprocess, each stage timed (CUDA events on GPU), with a progress callback. The loop is
`sampling.denoise` over `guided_euler(engine_step_fn(dit))`: one whole step (DiT + CFG + Euler) that,
with CUDA graphs on, is captured once per shape and replayed; nothing looks at the backend. With
`compile` on, the torch DiT's blocks are compiled when the DiT is loaded, the token count dynamic
(one compile serves every size); `stats()` counts compiles and graphs.

Threads: `edit` takes a per-runtime lock, so concurrent calls on one runtime run one after another
(the static buffers and graphs are shared); use one runtime per device for parallel work.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..choices import MAX_BATCH
from ..instructions import KnownTasks, UnknownInstructionWarning
from ..precision import Precision
from ..sources import known_tasks
from ..specs import ComponentSpec, dit_spec, vae_decoder_spec, vae_encoder_spec
from ..step1x_ref.configs import ModelConfig
from ..step1x_ref.flow import EditFlow
from ..step1x_ref.mllm.generation import Content, TextGenerator
from ..step1x_ref.mllm.reasoning import JUDGE_RETRIES, ReasonedEdit, reasoned_edit
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.sampling import Lane, ProgressFn, UpdateFn, denoise_lanes
from ..step1x_ref.versions import edit_version
from ..step1x_ref.weights.lora import LoraSpec
from ..threads import default_threads, torch_threads
from ..timing import StageTimer
from ..validate import SEED_RANGE, check_device, check_int
from .batching import DoneFn, EditJob, EditOutcome, JoinFn, LatentFn, run_batch, run_serially
from .denoiser import DiTUpdates
from .engines.buffers import Shape, edit_dims
from .engines.compile import compile_backend
from .engines.engine import Engine
from .lanes import EditLanes
from .loaders import TINY, engine_loaders, offloaded_dit, pipeline_loaders, torch_loaders
from .options import Backend, RuntimeOptions, with_overrides
from .parallel.dit import parallel_dit
from .parallel.layout import check_launched, rank_device
from .stages import Loader, Stages
from .step.caching import CachedStep, CacheStats
from .step.cudagraph import CudaGraphed, GraphCounts
from .telemetry.memory import DriverMemory, PeakMemory, check_preset_memory, read_peak, release_cached, reset_peak

ShapeCheck = Callable[[str, dict[str, Shape]], None]  # (component, {input: shape}) -> raises if outside
# `load`'s own keywords: what is loaded and where (every other keyword is a `RuntimeOptions` field).
LOAD_KEYWORDS = ("quant", "device", "dtype", "version", "mllm", "seed", "loras")
DTYPE_PRECISION = {torch.float32: Precision.FP32, torch.bfloat16: Precision.BF16, torch.float16: Precision.FP16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_of(dtype: torch.dtype) -> Precision:
    if dtype not in DTYPE_PRECISION:
        raise ValueError(f"runtime dtype {dtype} is not supported; use one of {', '.join(map(str, DTYPE_PRECISION))}")
    return DTYPE_PRECISION[dtype]


class Step1XEditRuntime(EditLanes, DiTUpdates):
    def __init__(
        self,
        config: ModelConfig,
        loaders: dict[str, Loader],
        options: RuntimeOptions,
        device: torch.device | str,
        *,
        shape_check: ShapeCheck | None = None,
        notes: tuple[str, ...] = (),
        known_tasks: KnownTasks | None = None,
    ):
        self.config, self.device = config, torch.device(device)
        options = options.resolved(self.device)
        small = config.tiny_qwen is not None
        threads = options.threads or default_threads(small_model=small, device_type=self.device.type)
        self.options = replace(options, threads=threads)  # what runs: the default resolved
        check_preset_memory(self.options.preset, config.tiny_qwen is None, edit_version(config).reasoning,
                            self.device)
        # the order of an edit and the version's rules, as the reference runs them (v1.2: its CFG branches in one
        # DiT call where the options' text bucket says so)
        self.flow = EditFlow(config, edit_version(config).joint(self.options.text_bucket or 0))
        self.version = self.flow.version
        if self.options.max_batch > 1:
            self.check_batching()
        if self.version.trimmed_text and self.options.parallel.world > 1:
            self._check_v1p2_parallel()
        self.notes = notes  # how the stages were built (e.g. "MLLM runs in torch"), for logs
        self.known_tasks = known_tasks  # the only instructions the model learned (the toy's), None: any
        self.last_warnings: list[str] = []  # the last edit's: an instruction the model did not learn
        self._shape_check = shape_check
        self._lock = threading.RLock()  # re-entered by edit_reasoned's edits
        self._update: tuple[Engine, UpdateFn] | None = None
        self._graphs: CudaGraphed | None = None
        self._graph_counts = GraphCounts()
        self._edits = 0
        self.step_seconds: list[float] = []  # the last edit's denoising steps
        self.last_latent: torch.Tensor | None = None  # the last edit's denoised tokens, before decode (fidelity checks)
        self.compiler = compile_backend(self.options.compile_mode) if self.options.compile else None
        self._compiles_before = self.compiler.compiles if self.compiler is not None else 0  # the backend is shared
        if self.compiler is not None:
            loaders = {**loaders, "dit": self._compiled(loaders["dit"])}
        self._cached_step: CachedStep | None = None
        self.cache_stats: CacheStats | None = None  # the last edit's computed / reused DiT calls (step caching)
        self.stages: Stages | None = Stages(loaders, self.device, sequential=self.options.sequential_load)
        self.timer = StageTimer(self.device)
        self.timings: dict[str, float] = {}
        self.peak_memory = PeakMemory(None, "no edit yet")
        self._driver = DriverMemory(self.device)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: str | Path,
        options: RuntimeOptions | Backend | None = None,
        *,
        quant: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        version: str | None = None,
        mllm: str | Path | None = None,
        seed: int = 0,
        loras: Sequence[LoraSpec] = (),
        **overrides: Any,
    ) -> Step1XEditRuntime:
        """A runtime over `source`, run as `options` (a `RuntimeOptions`, or just a backend name) with any of
        its fields given as keywords on top, e.g. `load("tiny", compile=True)`; an unknown keyword raises
        TypeError naming the valid ones.

        The other keywords say what is loaded and where. `source`: a tiny config name ("tiny": random weights
        from `seed`, as `Step1XEditPipeline.random`), a model dir with the official files (torch backend), or an
        export / engine dir (onnxruntime, tensorrt). For engine dirs the MLLM runs in torch from `mllm` (a
        Qwen2.5-VL directory, a model folder in either layout, or a tiny config name), default: the export's tiny
        config. `source` model folders may be in the official or the diffusers layout (detected); `version`
        defaults to what a diffusers folder says it holds, else v1.1. `loras` are merged into the torch DiT's
        weights before `quant` (an export or engine carries the LoRAs merged when it was made). `quant` is a
        calibration artifact applied to the torch DiT, or a quantized checkpoint (`step1x-export quantize`)
        loaded as the DiT. `dtype` sets the precision; without it (and without options or a `precision`
        keyword) bf16 on a GPU as upstream, fp32 on CPU and for tiny models (the test reference)."""
        device = check_device(device) if device is not None else default_device()
        check_int("seed", seed, *SEED_RANGE)
        if isinstance(options, str):  # the backend, as the second argument
            if "backend" in overrides:
                raise TypeError("Step1XEditRuntime.load: the backend is given twice")
            options, overrides["backend"] = None, options
        if options is None and dtype is None and "precision" not in overrides:
            tiny = str(source) in TINY or str(mllm) in TINY  # a config name, never a guess from a path
            dtype = torch.bfloat16 if device.type == "cuda" and not tiny else torch.float32
        if dtype is not None:
            if "precision" in overrides:
                raise TypeError("Step1XEditRuntime.load: give dtype or precision, not both")
            overrides["precision"] = precision_of(dtype)
        options = with_overrides(options or RuntimeOptions(), overrides, "Step1XEditRuntime.load",
                                 also=LOAD_KEYWORDS)
        if options.parallel.world > 1:
            check_launched(options.parallel)
            device = rank_device(device)
        backend = options.backend
        if backend == "torch":
            config, loaders, notes = torch_loaders(source, options.resolved(device), device, version=version,
                                                   quant=quant, seed=seed, loras=loras)
            return cls(config, loaders, options, device, notes=notes, known_tasks=known_tasks(source))
        if loras:
            raise ValueError(f"--lora applies to the torch backend; a {backend} export holds the weights it was made "
                             "from: merge the LoRA with `step1x-export export --lora FILE` (see README, LoRA)")
        if quant is not None:
            raise ValueError(f"--quant applies to the torch backend; a {backend} export has its quantization "
                             "(Q/DQ nodes) in the graph already")
        config, loaders, check, notes = engine_loaders(Path(source), backend, device,
                                                       options.precision.compute_dtype, mllm=mllm, seed=seed,
                                                       mllm_quant=options.mllm_quant)
        return cls(config, loaders, options, device, shape_check=check, notes=notes,
                   known_tasks=known_tasks(source) or known_tasks(mllm))

    @classmethod
    def from_pipeline(cls, pipe: Step1XEditPipeline, options: RuntimeOptions | None = None) -> Step1XEditRuntime:
        """Torch engines over a reference pipeline's modules (weights shared, not copied)."""
        precision = precision_of(pipe.dtype)
        options = options or RuntimeOptions(precision=precision)
        dit = offloaded_dit(parallel_dit(pipe.model, options.parallel), options, pipe.device)
        loaders = pipeline_loaders(pipe, pipe.device, precision.compute_dtype, dit=dit)
        return cls(pipe.config, loaders, options, pipe.device)

    # -- the edit -------------------------------------------------------------------------------
    def edit(
        self,
        image: Image.Image | None,
        instruction: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        cfg: float | None = None,
        size_level: int | None = None,
        negative_prompt: str | None = None,
        progress: ProgressFn | None = None,
        latents: LatentFn | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> Image.Image:
        """Edit `image` as `instruction` says; an image of the input's size. With `image=None`, generate a
        `width` x `height` image from the text (text-to-image: no reference tokens). Serialised per runtime.

        `steps` and `cfg` default to the model's (`ModelConfig.default_steps`, `default_cfg`); `size_level` to
        the model's: 1024 for the real model (upstream's), the largest its profile covers for a tiny one. Numbers
        are checked first (InputError naming the argument), and a stage that yields NaN or infinity raises
        NonFiniteError naming it: no picture is made of it. An instruction that is none of the few a model
        learned (`known_tasks`: the toy's) is warned about before any model work (UnknownInstructionWarning)
        and listed in `last_warnings`.
        """
        job = EditJob(image, instruction, seed=seed, steps=steps, cfg=cfg, size_level=size_level,
                      negative_prompt=negative_prompt, progress=progress, latents=latents)
        with self._lock, torch_threads(self.options.threads):
            self.last_warnings = self.instruction_warnings(instruction, text_to_image=image is None)
            for message in self.last_warnings:
                warnings.warn(message, UnknownInstructionWarning, stacklevel=2)
            timer = self.timer = StageTimer(self.device)
            reset_peak(self.device)
            self._driver = DriverMemory(self.device)
            lane = self.prepare_lane(job, width=width, height=height, timer=timer)
            with self._stage(timer, "dit", "denoise") as dit:
                try:
                    self._denoise(dit, lane)
                finally:
                    if self.stages.sequential:  # the DiT leaves the device after this block: its graphs too,
                        self._update = self._graphs = self._cached_step = None  # the step cache's hold included
            (outcome,) = self.finish_lanes([lane])
            if outcome.error is not None:
                raise outcome.error
            self.step_seconds = outcome.step_seconds
            self.timings = timer.resolve()
            self.peak_memory = read_peak(self.device, self._driver)
            assert outcome.image is not None
            return outcome.image

    def edit_batch(self, jobs: Sequence[EditJob], *, join: JoinFn | None = None, done: DoneFn | None = None,
                   max_batch: int | None = None) -> list[EditOutcome]:
        """Edit same-size `jobs` as one batch: each DiT call runs every edit still going (batch 2B with CFG),
        each at its own step, seed, guidance and schedule; each result equals the edit run alone.

        At every step boundary with room (`max_batch`, default `options.max_batch`), `join(room, key)` may
        hand more edits of the batch's size `key` (`batch_key`); they join there. An edit leaves when its
        schedule ends: its outcome goes to `done` at once (the rest keep running) and into the returned list,
        in finishing order. A failing edit (bad input, its progress callback raising) gets its error in its
        outcome; the others are not disturbed. Serialised per runtime, like `edit`.
        """
        max_batch = self.options.max_batch if max_batch is None else max_batch
        check_int("max_batch", max_batch, 1, MAX_BATCH)
        if max_batch > 1:
            self.check_batching()
        with self._lock, torch_threads(self.options.threads):
            if self.why_not_batched():  # one edit at a time, through `edit` (its stages freed in turn)
                return run_serially(self, jobs, join=join, done=done)
            return run_batch(self, jobs, join=join, done=done, max_batch=max_batch)

    def instruction_warnings(self, instruction: str, *, text_to_image: bool = False) -> list[str]:
        """Why `instruction` (with no input image: `text_to_image`) will make no real picture on this model: it is
        none of the few the model learned, or the model learned only edits (empty for a model that follows open
        instructions)."""
        if self.known_tasks is None or not isinstance(instruction, str):  # a non-str is refused by the edit
            return []
        messages = [self.known_tasks.text_to_image_warning()] if text_to_image else []
        return messages + [m for m in (self.known_tasks.warning(instruction),) if m is not None]

    def check_batching(self) -> None:
        """Raise ValueError unless this runtime can run several edits per DiT call."""
        why = self.why_not_batched()
        if why:
            raise ValueError(f"batched edits (max_batch > 1) are not supported here: {why}")

    def _check_v1p2_parallel(self) -> None:
        """v1.2 splits one CFG branch per rank (its one call's rows) or each branch's call by Ulysses heads, every
        branch at its own text length; what cannot run."""
        degrees, bucket, why = self.options.parallel, self.options.text_bucket, ""
        if degrees.ring > 1 and degrees.ulysses > 1:
            why = ("the ring carries v1.2's padded-text bias with K, the Ulysses exchange before it does not: use "
                   "one of them")
        elif degrees.cfg > 1 and not bucket:
            why = "cfg_degree 2 hands each rank its branch of the one CFG call: set text_bucket > 0"
        elif degrees.cfg == 1 and bucket:
            why = "sequence parallel (Ulysses, ring) splits each CFG branch's own call: set text_bucket 0"
        elif degrees.cfg > 1 and self.options.cache is not None:
            why = "step caching's rule reads the cond branch, which one rank holds (use ulysses_degree)"
        if why:
            raise ValueError(f"{self.config.name}: parallel degrees ({degrees}) cannot run here: {why}")

    def why_not_batched(self) -> str:
        """Why this runtime runs one edit per DiT call ("" when it can batch)."""
        return (f"{self.version.per_branch_dit} (text_bucket 0)" if self.version.per_branch_dit
                else f"batches run on the torch backend (the {self.options.backend} engines' profiles hold one "
                     "edit)" if self.options.backend != "torch"
                else "step caching decides per DiT call" if self.options.cache is not None
                else "parallel degrees split one edit" if self.options.parallel.world > 1
                else "sequential loading frees the MLLM during denoising" if self.options.sequential_load
                else "")

    def edit_reasoned(
        self, image: Image.Image, instruction: str, *, think: bool = False, reflect: int = 0,
        judge_retries: int = JUDGE_RETRIES, seed: int = 0, **edit_options: Any,
    ) -> ReasonedEdit:
        """v1.2's thinking (the MLLM rewrites the instruction) and up to `reflect` rounds of edit + the MLLM's
        judgement, around `edit`; returns the chosen image, every round's image and every generated text.
        The MLLM generates in torch, seeded from `seed`; edit i (0-based) draws its noise from `seed + i`, so
        each round starts from new noise, as upstream's one generator gives it."""
        if not self.version.reasoning:
            raise ValueError(f"thinking and reflection are v1.2 features; this runtime runs {self.config.name}")
        with self._lock, torch_threads(self.options.threads):
            if self.stages is None:
                raise RuntimeError("Step1XEditRuntime is closed")
            if getattr(self.stages.load("encoder"), "embedder", None) is None:
                raise ValueError("thinking and reflection need the MLLM in torch (its generate loop)")
            generations, edits = 0, 0

            def generate(system: str, content: list[Content]) -> str:
                # the MLLM is the stages' for each text, so with sequential loading it leaves before the DiT
                nonlocal generations
                with self.stages.use("encoder") as encoder:
                    generator = TextGenerator.for_embedder(encoder.embedder, seed)
                    generator.calls, generations = generations, generations + 1  # the seed of text i: seed + i
                    return generator(system, content)

            def edit(img: Image.Image, prompt: str) -> Image.Image:
                nonlocal edits
                edits += 1
                return self.edit(img, prompt, seed=seed + edits - 1, **edit_options)

            return reasoned_edit(edit, generate, image, instruction, think=think, reflect=reflect,
                                 retries=judge_retries)

    def _denoise(self, dit: Engine, lane: Lane) -> None:
        if self._update is None or self._update[0] is not dit:  # an update (and its graphs) per engine instance
            self._update = (dit, self._make_update(dit))
        self.begin_cache(lane)
        self._start_steps(lane)  # after the DiT's load: the first step's time is its own
        denoise_lanes(self._update[1], [lane])

    @contextmanager
    def _stage(self, timer: StageTimer, name: str, label: str) -> Iterator[Any]:
        assert self.stages is not None
        if name not in self.stages.resident:
            with timer.stage(f"load {name}"):
                self.stages.load(name)
        with self.stages.use(name) as engine, timer.stage(label):
            yield engine
            self._driver.sample()  # before a sequential load frees the stage

    @property
    def default_size_level(self) -> int:
        """The edit resolution `edit` uses when none is given: the model's (1024 real, the profile's top tiny)."""
        return self.flow.default_size_level

    def check_shapes(self, width: int, height: int, *, reference: bool = True) -> None:
        """Raise ProfileError (naming the component and its min/max) if an engine cannot run this size."""
        if self._shape_check is None:
            return
        for spec, batch in self.specs_and_batches():
            if spec.name == "vae_encoder" and not reference:
                continue  # text-to-image encodes nothing
            dims = edit_dims(self.config, width, height, batch, reference=reference)
            self._shape_check(spec.name, {t.name: t.shape(dims) for t in spec.inputs})

    def specs_and_batches(self) -> list[tuple[ComponentSpec, int]]:
        return [(vae_encoder_spec(self.config), 1), (dit_spec(self.config), 2), (vae_decoder_spec(self.config), 1)]

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free every engine, graph and static buffer (and the CUDA allocator's cache)."""
        with self._lock:
            if self.stages is not None:
                self.stages.close()
                self.stages.loaders.clear()
            self.stages, self._update, self._graphs, self.last_latent = None, None, None, None
            self._cached_step = None
            release_cached(self.device)

    @property
    def closed(self) -> bool:
        return self.stages is None

    def __enter__(self) -> Step1XEditRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
