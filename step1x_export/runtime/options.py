"""Every runtime optimisation is one toggle here, so a benchmark can walk the ladder one field at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from ..choices import ATTENTION, DEFAULT_GRAPH_CACHE, MAX_BATCH, MLLM_QUANT, TEXT_BUCKET
from ..precision import Precision
from ..threads import check_threads
from .parallel.degrees import ParallelDegrees
from .step.cache_spec import CacheSpec

if TYPE_CHECKING:  # plain options: the CLI's --help reads them without importing torch
    import torch

Backend = Literal["torch", "onnxruntime", "tensorrt"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnxruntime", "tensorrt")
SequentialLoad = bool | Literal["host"]


@dataclass(frozen=True)
class RuntimeOptions:
    """How `Step1XEditRuntime` runs. Defaults are on where lossless and supported.

    `cuda_graphs` and `compile` are requests: `resolved(device)` turns them off where they cannot run,
    and the runtime keeps the resolved copy, so `runtime.options` says what actually ran.
    `compile=None` (auto) compiles where it helps (the torch backend on CUDA); `True` compiles on any
    device, CPU included (slow to build there, but it is how tests run the compiled path).
    `exact_batches=None` (auto) promises bit-exact batches where they hold (CPU: the batch's GEMMs and
    activations run lane by lane); on CUDA a batch is one plain call (8-bit layers and compiled kernels differ
    per batch size anyway): each edit then differs from its edit alone by the GEMMs' summation order only
    (fp32 on CPU: under 1e-5 relative after 3 steps, tests/test_lanes.py; on a GPU in bf16 not yet measured);
    `True` pays for lanes there too.
    """

    backend: Backend = "torch"
    precision: Precision = Precision.BF16  # the DiT's (and MLLM's) compute precision; the VAE runs in fp32
    cuda_graphs: bool = True  # capture the whole denoising step once per shape, replay it (torch / TensorRT)
    compile: bool | None = None  # torch.compile each DiT block, the token count dynamic: one compile serves all sizes
    compile_mode: str | None = None  # torch.compile's mode (None: inductor's default), e.g. "max-autotune"
    graph_cache: int = DEFAULT_GRAPH_CACHE  # captured CUDA graphs kept (LRU); an evicted graph frees its memory
    shape_buckets: bool = False  # snap each edit to the nearest of specs.BUCKET_ASPECTS (changes pixels vs upstream)
    attention: str = "auto"  # SDPA kernel: auto (cuDNN first on Hopper+) | flash | cudnn | efficient | math
    attention_fp8: bool = False  # FP8 attention: not implemented
    # one stage on the device at a time (encoder gone before the DiT), cards <= 24 GB: True rebuilds each stage from
    # disk for its turn; "host" reads each once and swaps it from (pinned) host memory (`stages.py`)
    sequential_load: SequentialLoad = False
    mllm_quant: str | None = None  # "fp8" / "int8" / "int4": the MLLM's Linears weight-only (None: as loaded)
    cache: CacheSpec | str | None = None  # step caching: "teacache[:T]" / "fbcache[:T]" / "regione[:k=v,...]" (torch)
    cfg_degree: int = 1  # ranks splitting cond / uncond (torchrun); weights are replicated
    ulysses_degree: int = 1  # ranks splitting attention heads (all-to-all)
    ring_degree: int = 1  # ranks splitting the sequence for ring attention
    max_batch: int = 1  # same-size edits sharing each DiT call (`edit_batch`; the server's batches): 1 = alone
    exact_batches: bool | None = None  # each edit of a batch bit for bit as alone (GEMMs lane by lane); None: on CPU
    # a card-size preset (`presets.PRESETS`): its graphs, loading, MLLM format, batch and, where its DiT streams,
    # resident_blocks and prefetch_blocks (each where left unset)
    preset: str | None = None
    # v1.2: both CFG branches in one DiT call, texts padded to a multiple of this many tokens and the padding
    # masked (within fp32 rounding of the per-branch calls); 0: one call per branch at its own length, as the
    # published pipeline (bit-exact); None: TEXT_BUCKET on CUDA and for batches (max_batch > 1), else 0
    text_bucket: int | None = None
    threads: int | None = None  # torch's CPU threads during an edit (None: 1 for a small model on CPU, else torch's)
    # DiT block streaming: None keeps every block on the device; an int k keeps the first k blocks (double, then
    # single, as they run) on it and streams the others from pinned host memory, `prefetch_blocks` copies ahead.
    resident_blocks: int | None = None
    # streamed blocks copied ahead of the one running (device memory: this many + 1); None: the preset's, else 1
    prefetch_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if isinstance(self.graph_cache, bool) or not isinstance(self.graph_cache, int) or self.graph_cache < 1:
            raise ValueError(f"graph_cache must be an integer >= 1 (graphs kept), got {self.graph_cache!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTION)}")
        batch = self.max_batch
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be an integer in [1, {MAX_BATCH}] (edits per DiT call), got {batch!r}")
        bucket = self.text_bucket
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 0):
            raise ValueError(f"text_bucket must be an integer >= 0 (tokens; 0: a DiT call per CFG branch), "
                             f"got {bucket!r}")
        if bucket and self.backend != "torch":
            raise ValueError(f"text_bucket {bucket}: v1.2's one masked CFG call runs on backend torch (the mask is "
                             f"the torch runtime's), got {self.backend}; use text_bucket=0")
        if bucket and self.attention == "flash":
            raise ValueError(f"text_bucket {bucket}: v1.2's one CFG call masks its padded keys, which FlashAttention "
                             "does not take; choose another attention or text_bucket=0")
        check_threads(self.threads)
        check_sequential_load(self.sequential_load)
        if self.mllm_quant is not None and self.mllm_quant not in MLLM_QUANT:
            raise ValueError(f"unknown mllm_quant {self.mllm_quant!r}; choose one of {', '.join(MLLM_QUANT)}")
        if isinstance(self.cache, str):
            object.__setattr__(self, "cache", CacheSpec.parse(self.cache))
        if (self.cache is not None or self.parallel.world > 1) and self.backend != "torch":
            raise ValueError(f"step caching and parallel degrees need backend torch (the DiT in pieces), "
                             f"got {self.backend}")
        if bucket and self.region_cache:
            raise ValueError(f"text_bucket {bucket}: RegionE keeps one key/value cache per DiT call, so it runs each "
                             "CFG branch as its own call; use text_bucket=0")
        if self.attention_fp8:
            raise NotImplementedError("RuntimeOptions.attention_fp8: FP8 attention is not implemented yet")
        if self.preset is not None:
            self._apply_preset()
        self._check_streaming()

    @property
    def region_cache(self) -> bool:
        """RegionE is the step cache (it runs each CFG branch as its own call)."""
        return isinstance(self.cache, CacheSpec) and self.cache.region is not None

    def _apply_preset(self) -> None:
        """The preset's graph setting, loading and MLLM format over these fields; its batch as the most edits a
        DiT call may hold (its plan holds that many); a streamed DiT's resident blocks and prefetch where these
        fields leave them unset (None). Idempotent: `replace` runs it again on the result."""
        from ..presets import get_preset, refuse_gaps

        preset = get_preset(self.preset)  # type: ignore[arg-type]
        refuse_gaps(preset.name)
        if self.max_batch > preset.max_batch:
            raise ValueError(f"max_batch {self.max_batch} exceeds preset {preset.name}'s batch {preset.max_batch} "
                             f"(its memory plan holds {preset.max_batch} edit(s) per DiT call)")
        object.__setattr__(self, "cuda_graphs", self.cuda_graphs and preset.cuda_graphs)
        object.__setattr__(self, "sequential_load", self.sequential_load or preset.sequential_load)
        if self.mllm_quant is None:
            object.__setattr__(self, "mllm_quant", preset.mllm_quant)
        if self.resident_blocks is None:
            object.__setattr__(self, "resident_blocks", preset.resident_blocks_option)
        if self.prefetch_blocks is None and preset.dit_placement == "stream":
            object.__setattr__(self, "prefetch_blocks", preset.prefetch)

    def _check_streaming(self) -> None:
        blocks, ahead = self.resident_blocks, self.prefetch_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
            raise ValueError(f"resident_blocks must be None (all resident) or an integer >= 0 (DiT blocks kept on "
                             f"the device, the others streamed), got {blocks!r}")
        if ahead is not None and (isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1):
            raise ValueError(f"prefetch_blocks must be None (the preset's, else 1) or an integer >= 1 (blocks copied "
                             f"ahead), got {ahead!r}")
        if blocks is not None and (self.backend != "torch" or self.parallel.world > 1 or self.compile):
            source = f"preset {self.preset} sets resident_blocks {blocks}: " if self.preset else ""
            raise ValueError(f"{source}resident_blocks streams the torch DiT's other blocks in one process, eager: "
                             "it needs backend torch, no parallel degrees and compile off (got backend "
                             f"{self.backend}, {self.parallel.world} ranks, compile {self.compile})")

    @property
    def parallel(self) -> ParallelDegrees:
        return ParallelDegrees(cfg=self.cfg_degree, ulysses=self.ulysses_degree, ring=self.ring_degree)

    def resolved(self, device: torch.device) -> RuntimeOptions:
        """The toggles that take effect on `device`: graphs need CUDA; compile applies to a torch DiT.

        v1.2's text bucket (both CFG branches in one call) is on where that call pays, on CUDA (one launch
        per kernel instead of two, GEMMs twice as tall) and for batches (edits stack only as one call each); on
        CPU alone the two calls cost about what one does, and they are the exact path.
        ONNX Runtime runs on its own CUDA stream after a host sync, which a torch CUDA graph cannot capture
        (the sync fails during capture, and ORT's kernels would not be in the graph): no graphs there.
        A parallel DiT runs eager: its collectives have not been captured or compiled here.
        A streamed DiT (`resident_blocks`) runs eager and uncaptured: its copies and frees are queued per call;
        `prefetch_blocks` left unset (no preset set it) is 1.
        TensorRT keeps one graph: an engine has one execution context, and binding it to a new shape (input
        shapes, buffer addresses) invalidates what graphs captured at other shapes baked in.
        """
        cuda = device.type == "cuda"
        single = self.parallel.world == 1 and self.resident_blocks is None  # one process, every block resident
        graphs_ok = cuda and self.backend != "onnxruntime" and single
        compile_on = self.backend == "torch" and single and (cuda if self.compile is None else self.compile)
        graphs = self.cuda_graphs and graphs_ok
        cache = 1 if graphs and self.backend == "tensorrt" else self.graph_cache
        exact = not cuda if self.exact_batches is None else self.exact_batches
        bucket = self.text_bucket
        if bucket is None:  # where one batch-2 call pays: a GPU's launches and GEMM shapes, or a batch's one call
            # cfg parallel hands each rank its branch of the one call; a sequence split alone runs the branches apart
            one_call = self.parallel.cfg > 1 or self.parallel.world == 1 and (cuda or self.max_batch > 1)
            maskable = self.backend == "torch" and self.attention != "flash"  # the key mask's kernels
            bucket = TEXT_BUCKET if one_call and maskable and not self.region_cache else 0
        return replace(self, cuda_graphs=graphs, compile=compile_on, graph_cache=cache, exact_batches=exact,
                       text_bucket=bucket, prefetch_blocks=self.prefetch_blocks or 1)


def option_names() -> tuple[str, ...]:
    """Every `RuntimeOptions` field, in declaration order: the one list of the runtime's toggles."""
    return tuple(f.name for f in fields(RuntimeOptions))


def with_overrides(options: RuntimeOptions, overrides: Mapping[str, Any], caller: str,
                   also: Sequence[str] = ()) -> RuntimeOptions:
    """`options` with the fields named in `overrides` replaced (and checked, as any `RuntimeOptions`);
    a name that is no field raises TypeError listing the fields (and `also`: the caller's own keywords)."""
    unknown = sorted(set(overrides) - set(option_names()))
    if unknown:
        raise TypeError(f"{caller}: unknown keyword(s) {', '.join(unknown)}; valid: {', '.join(also)} and the "
                        f"RuntimeOptions fields {', '.join(option_names())}")
    return replace(options, **overrides)


def changed_fields(options: RuntimeOptions) -> dict[str, Any]:
    """The fields of `options` that differ from the defaults, by name (as `with_overrides` takes them)."""
    default = RuntimeOptions()
    return {name: value for name in option_names() if (value := getattr(options, name)) != getattr(default, name)}


def check_sequential_load(value: object) -> None:
    if isinstance(value, bool) or value == "host":
        return
    raise ValueError(f"sequential_load must be False (every stage resident), True (each stage rebuilt from disk for "
                     f"its turn) or 'host' (each stage read once and swapped from host memory), got {value!r}")
