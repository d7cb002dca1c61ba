"""The device memory of an edit, stage by stage, for any configuration, computed without weights.

Per stage: the weights it holds (its modules' parameters and buffers, built on `meta` from the real
configs, quantized as asked), its activation peak (a traced forward, `tracer.trace_peak`), and the
device total while it runs: every stage's weights plus this stage's activations when all stages are
resident, this stage's weights plus its activations with sequential loading. The edit's figure is
the largest stage total.

Also counted: the CUDA context (`CUDA_CONTEXT`, a stated constant) and, with CUDA graphs, the captured
graphs' memory pools. Each captured step keeps a private pool as large as the DiT's activation peak at
its size, alive between edits and so during every other stage (the MLLM and VAE of the next edit): the
plan counts `graph_cache` pools of the planned size (a server that has seen that many sizes of this
area). With sequential loading the runtime drops its graphs with the DiT, so no pool outlives the stage.
Not counted: cuBLAS / attention workspaces, allocator rounding and compile caches: the runtime's
driver-level peak (`runtime.telemetry.memory`) is the figure to check a plan against on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..calibrate.weight_only import WEIGHT_ONLY_FORMATS
from ..choices import DEFAULT_GRAPH_CACHE, DIT_QUANT
from ..presets import CUDA_CONTEXT
from ..step1x_ref.configs import get_config
from ..step1x_ref.imaging import edit_size
from .stages import STAGES, StageModel, build_stage
from .tracer import resident_bytes, trace_peak

GiB = 2**30
WEIGHT_ONLY = WEIGHT_ONLY_FORMATS
# Usable memory of a 24 GB card (24 GiB minus the CUDA context and driver reserve).
CARD_24GB_USABLE = 23.6 * GiB


@dataclass(frozen=True)
class PlanConfig:
    """What the device holds: the DiT's W8A8 recipe, weight-only layers of the DiT and the MLLM, and the load order."""

    quant: str = "none"  # the DiT's W8A8 recipe (default layer selection), or none
    weight_only: str = "none"  # the DiT's modulation and connector Linears, weight-only 8-bit
    mllm_quant: str = "none"  # Qwen2.5-VL's Linears, weight-only
    sequential_load: bool = False
    cuda_graphs: bool = True  # as the runtime's option (default on): captured steps keep their pools
    graph_cache: int = DEFAULT_GRAPH_CACHE  # captured graphs kept (one pool each)

    def __post_init__(self) -> None:
        if self.graph_cache < 1:
            raise ValueError(f"graph_cache must be >= 1, got {self.graph_cache}")
        if self.quant not in DIT_QUANT:
            raise ValueError(f"unknown --quant {self.quant!r}; choose one of {', '.join(DIT_QUANT)}")
        for name in ("weight_only", "mllm_quant"):
            if getattr(self, name) not in WEIGHT_ONLY:
                raise ValueError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; "
                                 f"choose one of {', '.join(WEIGHT_ONLY)}")


# Named configurations. "24gb": every stage resident at 1024^2 on a 24 GB card (see docs/memory.md).
PRESETS: dict[str, PlanConfig] = {
    "bf16": PlanConfig(),
    "fp8": PlanConfig(quant="fp8"),
    # Weight-only layers in int8 (per-channel): the same bytes as fp8 and 4x less error on the tiny model.
    # No CUDA graphs: one graph's pool (2.6 GiB at 1024^2) does not fit beside the VAE decoder, and a graph
    # of the step gained ~1% at 512^2 on an H200 (launch overhead is not what a 1024^2 step spends).
    "24gb": PlanConfig(quant="fp8", weight_only="int8", mllm_quant="int8", cuda_graphs=False),
}


@dataclass(frozen=True)
class StagePlan:
    name: str
    weights: int  # bytes this stage's modules hold
    activations: int  # activation peak of its largest forward
    resident: int  # weights on the device while it runs (all stages', or its own when sequential)
    graph_pools: int  # captured graphs' pools held while it runs (the DiT's own activations live in one)
    context: int  # the CUDA context
    total: int  # resident + context + pools + activations (the DiT: + the larger of its activations and the pools)


class StagePeak:
    """An edit's peak over its stages (`stages`, each with a `total`): the largest total and its stage."""

    stages: list

    @property
    def total(self) -> int:
        return max(s.total for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.total).name


@dataclass(frozen=True)
class MemoryPlan(StagePeak):
    model: str
    width: int
    height: int
    config: PlanConfig
    preset: str | None
    stages: list[StagePlan] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"model": self.model, "width": self.width, "height": self.height, "preset": self.preset,
                "config": asdict(self.config), "stages": [asdict(s) for s in self.stages],
                "total_bytes": self.total, "total_gib": round(self.total / GiB, 3), "peak_stage": self.peak_stage,
                "not_counted": "library workspaces, allocator rounding, compile caches"}

    def table(self) -> str:
        c = self.config
        graphs = f"CUDA graphs (cache {c.graph_cache})" if c.cuda_graphs else "no CUDA graphs"
        head = (f"{self.model} {self.width}x{self.height}, batch 2 (true CFG); DiT {c.quant}, weight-only "
                f"{c.weight_only}, MLLM {c.mllm_quant}, {'sequential' if c.sequential_load else 'all resident'}, "
                f"{graphs}" + (f" (preset {self.preset})" if self.preset else ""))
        rows = [f"{'stage':<12} {'weights':>9} {'activ.':>9} {'resident':>9} {'pools':>9} {'context':>9} "
                f"{'total':>9}  (GiB)"]
        rows += [f"{s.name:<12} {s.weights / GiB:9.2f} {s.activations / GiB:9.2f} {s.resident / GiB:9.2f} "
                 f"{s.graph_pools / GiB:9.2f} {s.context / GiB:9.2f} {s.total / GiB:9.2f}" for s in self.stages]
        rows.append(f"peak: {self.total / GiB:.2f} GiB during {self.peak_stage} (+ library workspaces)")
        return "\n".join([head, *rows])


def stage_activations(stage: StageModel) -> int:
    """The largest activation peak of the stage's forwards (weights and inputs not counted)."""
    existing = (*stage.module.parameters(), *stage.module.buffers(), *stage.inputs)
    return max(trace_peak(lambda f=f, x=x: f(*x), existing).peak_bytes for f, x in stage.passes)


def make_plan(model: str = "v1.1", size_level: int = 1024, *, config: PlanConfig | None = None,
              preset: str | None = None, width: int | None = None, height: int | None = None,
              dtype: torch.dtype = torch.bfloat16, think: bool = False, reflect: int = 0) -> MemoryPlan:
    """The plan for an edit of a square image at `size_level` (or `width` x `height` input pixels); v1.2's
    `think` / `reflect` add the MLLM's text generation (`mllm_generate`: its LM head held by the MLLM)."""
    from .generation import Mode, generation_activations, lm_head_bytes

    mode = Mode(model, think, reflect)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        config = PRESETS[preset]
    config = config or PlanConfig()
    cfg = get_config(model)
    w, h = edit_size(width or size_level, height or size_level, size_level)
    stages = [build_stage(name, cfg, w, h, dtype=dtype, quant=None if config.quant == "none" else config.quant,
                          weight_only=WEIGHT_ONLY[config.weight_only], mllm_quant=WEIGHT_ONLY[config.mllm_quant])
              for name in STAGES]
    weights = {s.name: resident_bytes(s.module) for s in stages}
    activations = {s.name: stage_activations(s) for s in stages}
    names = list(STAGES)
    if mode.generates:
        weights["mllm"] += lm_head_bytes(model, WEIGHT_ONLY[config.mllm_quant], dtype)
        weights["mllm_generate"], activations["mllm_generate"] = weights["mllm"], generation_activations(model)
        names.insert(0, "mllm_generate")
    pools = graph_pools(config, activations["dit"])
    out = []
    for name in names:
        act = activations[name]
        own = weights[name]
        resident = own if config.sequential_load else sum(w for k, w in weights.items() if k != "mllm_generate")
        held = max(pools, act) if name == "dit" else pools + act  # the DiT's activations are in a pool
        out.append(StagePlan(name, own, act, resident, pools, CUDA_CONTEXT, resident + CUDA_CONTEXT + held))
    return MemoryPlan(model, w, h, config, preset, out)


def graph_pools(config: PlanConfig, dit_activations: int) -> int:
    """Bytes the captured graphs keep between edits: `graph_cache` pools of the DiT step's activation peak
    (none without graphs, or with sequential loading, which drops the graphs with the DiT)."""
    if not config.cuda_graphs or config.sequential_load:
        return 0
    return config.graph_cache * dit_activations
