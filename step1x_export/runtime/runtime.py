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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..choices import MAX_BATCH
from ..precision import Precision
from ..specs import ComponentSpec, dit_spec, profile_for, vae_decoder_spec, vae_encoder_spec
from ..step1x_ref.configs import ModelConfig
from ..step1x_ref.edit_v1p2 import per_branch
from ..step1x_ref.generation import TextGenerator
from ..step1x_ref.lora import LoraSpec
from ..step1x_ref.pipeline import (
    EditImage,
    Step1XEditPipeline,
    no_reference,
)
from ..step1x_ref.reasoning import JUDGE_RETRIES, ReasonedEdit, reasoned_edit
from ..step1x_ref.sampling import Lane, ProgressFn, UpdateFn, denoise_lanes, guided_euler, pack
from ..timing import StageTimer
from ..validate import SEED_RANGE, check_device, check_finite, check_int
from .attention import with_attention
from .batching import DoneFn, EditJob, EditOutcome, JoinFn, run_batch, run_serially
from .buffers import Shape, edit_dims
from .caching import CachedStep, CacheSpec, CacheStats
from .compile import compile_backend, compile_blocks
from .cudagraph import CudaGraphed, GraphCounts
from .engine import Engine
from .lane_gemms import lane_exact
from .lanes import EditLanes
from .loaders import TINY, engine_loaders, pipeline_loaders, torch_loaders
from .memory import DriverMemory, PeakMemory, read_peak, release_cached, reset_peak
from .options import DEFAULT_GRAPH_CACHE, Backend, RuntimeOptions
from .parallel.dit import parallel_dit
from .parallel.layout import ParallelDegrees, check_launched, rank_device
from .stages import Loader, Stages
from .stats import RuntimeStats
from .step import engine_step_fn

ShapeCheck = Callable[[str, dict[str, Shape]], None]  # (component, {input: shape}) -> raises if outside
DTYPE_PRECISION = {torch.float32: Precision.FP32, torch.bfloat16: Precision.BF16, torch.float16: Precision.FP16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_of(dtype: torch.dtype) -> Precision:
    if dtype not in DTYPE_PRECISION:
        raise ValueError(f"runtime dtype {dtype} is not supported; use one of {', '.join(map(str, DTYPE_PRECISION))}")
    return DTYPE_PRECISION[dtype]


class Step1XEditRuntime(EditLanes):
    def __init__(
        self,
        config: ModelConfig,
        loaders: dict[str, Loader],
        options: RuntimeOptions,
        device: torch.device | str,
        *,
        shape_check: ShapeCheck | None = None,
        notes: tuple[str, ...] = (),
    ):
        self.config, self.device = config, torch.device(device)
        self.options = options.resolved(self.device)
        if self.options.max_batch > 1:
            self.check_batching()
        if config.reason_edit is not None and (self.options.cache is not None or self.options.parallel.world > 1):
            # both work on the batch-2 DiT call; v1.2 runs one call per CFG branch (their text lengths differ)
            raise ValueError(f"{config.name}: step caching and parallel degrees are not supported for v1.2 yet")
        self.notes = notes  # how the stages were built (e.g. "MLLM runs in torch"), for logs
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
        backend: Backend = "torch",
        *,
        quant: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
        sequential_load: bool = False,
        compile: bool | None = None,
        compile_mode: str | None = None,
        graph_cache: int = DEFAULT_GRAPH_CACHE,
        shape_buckets: bool = False,
        version: str | None = None,
        mllm: str | Path | None = None,
        seed: int = 0,
        mllm_quant: str | None = None,
        cache: CacheSpec | str | None = None,
        cfg_degree: int = 1,
        ulysses_degree: int = 1,
        ring_degree: int = 1,
        max_batch: int = 1,
        loras: Sequence[LoraSpec] = (),
        attention: str = "auto",
    ) -> Step1XEditRuntime:
        """A runtime over `source`: a tiny config name ("tiny": random weights from `seed`, as
        `Step1XEditPipeline.random`), a model dir with the official files (torch backend), or an
        export / engine dir (onnxruntime, tensorrt). For engine dirs the MLLM runs in torch from
        `mllm` (a Qwen2.5-VL directory, a model folder in either layout, or a tiny config name), default: the
        export's tiny config. `source` model folders may be in the official or the diffusers layout (detected);
        `version` defaults to what a diffusers folder says it holds, else v1.1. `loras` are merged into the
        torch DiT's weights before `quant` (an export or engine carries the LoRAs merged when it was made).
        `quant` is a calibration artifact applied to the torch DiT, or a quantized checkpoint (`step1x-export
        quantize`) loaded as the DiT; `mllm_quant` ("fp8" / "int8") makes the MLLM's Linears weight-only 8-bit.
        `compile`: None compiles the torch DiT
        on CUDA only, True on any device (CPU included), False never; `graph_cache` bounds the CUDA graphs
        kept (one per edit size, least recently used evicted); `shape_buckets` snaps each edit to the nearest
        of `specs.BUCKET_ASPECTS` (the output is still the input's size). `cache` turns on step caching;
        degrees > 1 split the DiT over torchrun's ranks (one GPU each); `attention` picks the SDPA kernel
        (`runtime.attention`). `max_batch` bounds `edit_batch`'s batch."""
        device = check_device(device) if device is not None else default_device()
        check_int("seed", seed, *SEED_RANGE)
        degrees = ParallelDegrees(cfg=cfg_degree, ulysses=ulysses_degree, ring=ring_degree)
        if degrees.world > 1:
            check_launched(degrees)
            device = rank_device(device)
        if dtype is None:  # bf16 on a GPU as upstream; fp32 on CPU (and for tiny models, the test reference)
            tiny = str(source) in TINY or str(mllm) in TINY  # a config name, never a guess from a path
            dtype = torch.bfloat16 if device.type == "cuda" and not tiny else torch.float32
        options = RuntimeOptions(
            backend=backend, precision=precision_of(dtype), cuda_graphs=cuda_graphs, compile=compile,
            compile_mode=compile_mode, graph_cache=graph_cache, shape_buckets=shape_buckets,
            sequential_load=sequential_load, mllm_quant=mllm_quant, cache=cache, cfg_degree=cfg_degree,
            ulysses_degree=ulysses_degree, ring_degree=ring_degree, attention=attention, max_batch=max_batch,
        )
        if backend == "torch":
            config, loaders, notes = torch_loaders(source, options.resolved(device), device, version=version,
                                                   quant=quant, seed=seed, loras=loras)
            return cls(config, loaders, options, device, notes=notes)
        if loras:
            raise ValueError(f"--lora applies to the torch backend; a {backend} export holds the weights it was made "
                             "from: merge the LoRA with `step1x-export export --lora FILE` (see README, LoRA)")
        if quant is not None:
            raise ValueError(f"--quant applies to the torch backend; a {backend} export has its quantization "
                             "(Q/DQ nodes) in the graph already")
        config, loaders, check, notes = engine_loaders(Path(source), backend, device, dtype, mllm=mllm, seed=seed,
                                                       mllm_quant=mllm_quant)
        return cls(config, loaders, options, device, shape_check=check, notes=notes)

    @classmethod
    def from_pipeline(cls, pipe: Step1XEditPipeline, options: RuntimeOptions | None = None) -> Step1XEditRuntime:
        """Torch engines over a reference pipeline's modules (weights shared, not copied)."""
        precision = precision_of(pipe.dtype)
        options = options or RuntimeOptions(precision=precision)
        dit = parallel_dit(pipe.model, options.parallel)
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
        width: int | None = None,
        height: int | None = None,
    ) -> Image.Image:
        """Edit `image` as `instruction` says; an image of the input's size. With `image=None`, generate a
        `width` x `height` image from the text (text-to-image: no reference tokens). Serialised per runtime.

        `steps` and `cfg` default to the model's (`ModelConfig.default_steps`, `default_cfg`); `size_level` to
        the model's: 1024 for the real model (upstream's), the largest its profile covers for a tiny one. Numbers
        are checked first (InputError naming the argument), and a stage that yields NaN or infinity raises
        NonFiniteError naming it: no picture is made of it.
        """
        job = EditJob(image, instruction, seed=seed, steps=steps, cfg=cfg, size_level=size_level,
                      negative_prompt=negative_prompt, progress=progress)
        with self._lock:
            timer = self.timer = StageTimer(self.device)
            reset_peak(self.device)
            self._driver = DriverMemory(self.device)
            lane = self.prepare_lane(job, width=width, height=height, timer=timer)
            with self._stage(timer, "dit", "denoise") as dit:
                try:
                    self._denoise(dit, lane)
                finally:
                    if self.stages.sequential:  # the DiT is freed after this block: its graphs (and memory) too,
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
        with self._lock:
            if self.why_not_batched():  # one edit at a time, through `edit` (its stages freed in turn)
                return run_serially(self, jobs, join=join, done=done)
            return run_batch(self, jobs, join=join, done=done, max_batch=max_batch)

    def check_batching(self) -> None:
        """Raise ValueError unless this runtime can run several edits per DiT call."""
        why = self.why_not_batched()
        if why:
            raise ValueError(f"batched edits (max_batch > 1) are not supported here: {why}")

    def why_not_batched(self) -> str:
        """Why this runtime runs one edit per DiT call ("" when it can batch)."""
        return ("v1.2 runs one DiT call per CFG branch" if self.config.reason_edit is not None
                else f"batches run on the torch backend (the {self.options.backend} engines' profiles hold one "
                     "edit)" if self.options.backend != "torch"
                else "step caching decides per DiT call" if self.options.cache is not None
                else "parallel degrees split one edit" if self.options.parallel.world > 1
                else "sequential loading frees the MLLM during denoising" if self.options.sequential_load
                else "")

    def batch_update(self) -> UpdateFn:
        """The DiT's whole-step update for batched lanes (the resident DiT; graphs per size and batch bucket)."""
        assert self.stages is not None
        dit = self.stages.load("dit")
        if self._update is None or self._update[0] is not dit:
            self._update = (dit, self._make_update(dit))
        return self._update[1]

    def edit_reasoned(
        self, image: Image.Image, instruction: str, *, think: bool = False, reflect: int = 0,
        judge_retries: int = JUDGE_RETRIES, seed: int = 0, **edit_options: Any,
    ) -> ReasonedEdit:
        """v1.2's thinking (the MLLM rewrites the instruction) and up to `reflect` rounds of edit + the MLLM's
        judgement, around `edit`; returns the chosen image, every round's image and every generated text.
        The MLLM generates in torch, seeded from `seed`; edit i (0-based) draws its noise from `seed + i`, so
        each round starts from new noise, as upstream's one generator gives it."""
        if self.config.reason_edit is None:
            raise ValueError(f"thinking and reflection are v1.2 features; this runtime runs {self.config.name}")
        with self._lock:
            if self.stages is None:
                raise RuntimeError("Step1XEditRuntime is closed")
            embedder = getattr(self.stages.load("encoder"), "embedder", None)
            if embedder is None:
                raise ValueError("thinking and reflection need the MLLM in torch (its generate loop)")
            generate = TextGenerator.for_embedder(embedder, seed)
            edits = 0

            def edit(img: Image.Image, prompt: str) -> Image.Image:
                nonlocal edits
                edits += 1
                return self.edit(img, prompt, seed=seed + edits - 1, **edit_options)

            return reasoned_edit(edit, generate, image, instruction, think=think, reflect=reflect,
                                 retries=judge_retries)

    def _reference(self, timer: StageTimer, img: EditImage) -> torch.Tensor:
        """The packed reference latent (the VAE encoder stage), or no tokens for text-to-image."""
        if img.resized is None:
            return no_reference(self.config, self.device)
        with self._stage(timer, "vae_encoder", "vae_encode") as vae_encoder:
            ref = pack(vae_encoder(image=img.resized.to(self.device) * 2 - 1)["latent"].float())
            check_finite("the VAE encoder (reference latent)", ref)
            return ref

    def _denoise(self, dit: Engine, lane: Lane) -> None:
        if self._update is None or self._update[0] is not dit:  # an update (and its graphs) per engine instance
            self._update = (dit, self._make_update(dit))
        if self._cached_step is not None:
            self._cached_step.begin(lane.steps)
            self.cache_stats = self._cached_step.stats
        self._start_steps(lane)  # after the DiT's load: the first step's time is its own
        denoise_lanes(self._update[1], [lane])

    def _compiled(self, load_dit: Loader) -> Loader:
        """The DiT loader, its blocks compiled on load (the torch backend: `resolved` turns compile off elsewhere)."""

        def load() -> Any:
            engine = load_dit()
            module = getattr(engine, "module", None)
            if module is None or not hasattr(module, "double_blocks"):
                raise ValueError(f"compile applies to a torch DiT; the dit stage is a {type(engine).__name__}")
            assert self.compiler is not None
            compile_blocks(module, self.compiler)
            return engine

        return load

    def stats(self) -> RuntimeStats:
        """Edits, compiles and CUDA graphs since load (graphs: captured, held now, evicted)."""
        return RuntimeStats(
            edits=self._edits,
            compiles=self.compiler.compiles - self._compiles_before if self.compiler is not None else 0,
            graphs_captured=self._graph_counts.captured,
            graphs_cached=self._graphs.graphs if self._graphs is not None else 0,
            graphs_evicted=self._graph_counts.evicted,
            graph_cache=self.options.graph_cache,
            step_ms=[1000 * s for s in self.step_seconds],
        )

    def _make_update(self, dit: Engine) -> UpdateFn:
        self._cached_step = None
        if self.options.cache is not None:  # a data-dependent step: its pieces are graphed, not the whole step
            assert isinstance(self.options.cache, CacheSpec)
            self._cached_step = CachedStep(dit, self.options.cache, cuda_graphs=self.options.cuda_graphs,
                                           capacity=self.options.graph_cache, counts=self._graph_counts)
            self._graphs = None
            return with_attention(guided_euler(self._cached_step), self.options.attention, self.device)
        step = lane_exact(engine_step_fn(dit), getattr(dit, "module", None))  # a batch: each edit's own GEMMs
        # v1.2: the CFG branches' text lengths differ, so the DiT runs once per branch (batch 1).
        update = guided_euler(per_branch(step) if self.config.reason_edit is not None else step)
        update = with_attention(update, self.options.attention, self.device)  # in force when traced and captured
        self._graphs = None
        if self.options.cuda_graphs:  # the whole step (DiT + CFG + Euler), captured once per shape
            update = self._graphs = CudaGraphed(update, enabled=True, capacity=self.options.graph_cache,
                                                counts=self._graph_counts)
        return update

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
        return profile_for(self.config).max_level

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
