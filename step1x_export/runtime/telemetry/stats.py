"""What a runtime has done since it was loaded: edits, compiles, captured graphs, the last edit's steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RuntimeStats:
    edits: int  # finished edits
    compiles: int  # graphs torch.compile built for the DiT's blocks (one per block type serves every size)
    graphs_captured: int  # CUDA graphs captured (a new size, or one seen again after eviction)
    graphs_cached: int  # CUDA graphs held now (<= graph_cache)
    graphs_evicted: int  # graphs dropped, least recently used first, to stay within graph_cache
    graph_cache: int  # the cache's capacity (RuntimeOptions.graph_cache)
    step_ms: list[float] = field(default_factory=list)  # the last edit's denoising steps (device time on CUDA)
    cache: dict[str, Any] | None = None  # the last edit's step cache: computed / reused steps (RegionE: its plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.edits} edit(s), {self.compiles} compile(s), {self.graphs_captured} CUDA graph(s) captured, "
                f"{self.graphs_cached}/{self.graph_cache} cached, {self.graphs_evicted} evicted")
