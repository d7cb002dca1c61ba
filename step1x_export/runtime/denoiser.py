"""The denoising loop's step as the runtime builds it: the DiT engine's whole-step update (DiT + CFG +
Euler, the version's step over its conditioning), with the DiT's blocks compiled on load, the step captured
in CUDA graphs per shape, or step caching deciding per DiT call; and the counts `stats()` reports."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from ..step1x_ref.sampling import UpdateFn, guided_euler
from .engines.compile import compile_blocks
from .engines.engine import Engine
from .step.attention import with_attention
from .step.caching import CachedStep, CacheSpec, CacheStats
from .step.cudagraph import CudaGraphed, GraphCounts
from .step.engine_step import engine_step_fn
from .step.lane_gemms import lane_exact
from .step.region_step import RegionUpdate
from .telemetry.stats import RuntimeStats

if TYPE_CHECKING:
    from ..step1x_ref.sampling import Lane
    from ..step1x_ref.versions import EditVersion
    from .options import RuntimeOptions
    from .stages import Loader, Stages


class DiTUpdates:
    """`Step1XEditRuntime`'s denoising step (a mixin: the runtime supplies the attributes)."""

    version: EditVersion
    options: RuntimeOptions
    device: torch.device
    stages: Stages | None
    compiler: Any
    cache_stats: CacheStats | None
    step_seconds: list[float]
    _update: tuple[Engine, UpdateFn] | None
    _graphs: CudaGraphed | None
    _graph_counts: GraphCounts
    _cached_step: CachedStep | RegionUpdate | None
    _compiles_before: int
    _edits: int

    def batch_update(self) -> UpdateFn:
        """The DiT's whole-step update for batched lanes (the resident DiT; graphs per size and batch bucket)."""
        assert self.stages is not None
        dit = self.stages.load("dit")
        if self._update is None or self._update[0] is not dit:
            self._update = (dit, self._make_update(dit))
        return self._update[1]

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

    def begin_cache(self, lane: Lane) -> None:
        """Start the step cache's edit (its counters, RegionE's plan over the lane's schedule and token grid)."""
        step = self._cached_step
        if isinstance(step, RegionUpdate):
            img = lane.tag.img  # type: ignore[union-attr]
            step.begin(lane, (img.height // 16, img.width // 16))
        elif step is not None:
            step.begin(lane.steps)
        self.cache_stats = step.stats if step is not None else None

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
            cache=asdict(self.cache_stats) if self.cache_stats is not None else None,
        )

    def _make_update(self, dit: Engine) -> UpdateFn:
        self._cached_step = None
        cache = self.options.cache
        if isinstance(cache, CacheSpec) and cache.region is None:  # a data-dependent step: its pieces are
            # graphed, not the whole step
            version = self.version  # v1.2: a call per CFG branch or one masked call; its rule reads the cond branch
            self._cached_step = CachedStep(dit, cache, cuda_graphs=self.options.cuda_graphs,
                                           capacity=self.options.graph_cache, counts=self._graph_counts,
                                           branches=2 if version.per_branch_dit else 1,
                                           masked=version.trimmed_text and not version.per_branch_dit,
                                           cond_signal=version.trimmed_text)
            self._graphs = None
            return with_attention(guided_euler(self._cached_step), self.options.attention, self.device)
        step = engine_step_fn(dit)
        if self.options.exact_batches:  # a batch: each edit's own GEMMs (CPU, or asked for)
            step = lane_exact(step, getattr(dit, "module", None))
        update = guided_euler(self.version.step(step))  # v1.2: the DiT once per CFG branch
        update = with_attention(update, self.options.attention, self.device)  # in force when traced and captured
        self._graphs = None
        if self.options.cuda_graphs:  # the whole step (DiT + CFG + Euler), captured once per shape
            update = self._graphs = CudaGraphed(update, enabled=True, capacity=self.options.graph_cache,
                                                counts=self._graph_counts)
        if isinstance(cache, CacheSpec) and cache.region is not None:  # RegionE: this update runs its full steps;
            # its other steps' token counts vary per edit: eager or compiled, not graphed
            self._cached_step = RegionUpdate(dit, self.version, cache.region, update)
            return with_attention(self._cached_step, self.options.attention, self.device)
        return update
