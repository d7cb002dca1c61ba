"""A preset's device memory at one size, every term counted, and what it moves over PCIe per edit.

Per stage of an edit (run order; v1.2 with thinking or reflection adds `mllm_generate`: the MLLM writing
text about one or two images), the device holds:

- weights: the VAE always; the MLLM and the DiT by their placement (`presets.py`): resident always,
  swapped during their own stage only, streamed (the DiT) = during its stage only, its non-block part and
  `resident_blocks` blocks, plus the block computing and `prefetch` blocks arriving (each counted as the
  largest streamed block) and, for 4-bit blocks, one dequantization scratch (the largest Linear in bf16);
- activations: the traced forward's peak (`plan.stage_activations`), the DiT at `2 x max_batch` rows;
  `mllm_generate` = the vision tower over the judge's two images and the prefill of the longest judging
  prompt, plus the KV cache at that prompt + the published 128 new tokens;
- the CUDA context (`plan.CUDA_CONTEXT`, a stated constant until first light measures it);
- library workspaces: cuBLAS and cuBLASLt, 32 MiB each (the size the cuBLAS documentation recommends on
  Hopper, 4 MiB elsewhere; PyTorch keeps one per handle and stream: counted at 32 MiB on every card, one
  compute stream: the copy stream runs no GEMMs); cuDNN 256 MiB in the stages that run cuDNN (VAE
  convolutions, the DiT's cuDNN attention) — cuDNN documents no fixed size (each algorithm states its own),
  so this is a stated budget, `CUDNN_CONV_WSCAP_DBG` (MiB) caps what convolutions may take;
- CUDA-graph pools: one of the DiT's activation peak per cached graph when the preset captures graphs;
- a fragmentation margin: 10 % of the stage's transient bytes (activations, streaming buffers, pools), at
  least 256 MiB: the caching allocator's 2 MiB segments and 512 B rounding, and freed blocks too small for
  the next request.

Host RAM: the pinned host copies of swapped and streamed weights plus `HOST_PROCESS` for the process.
PCIe per edit: each swapped stage's weights once per entry into it (a streamed DiT's resident part too);
each streamed block once per DiT call.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch

from ..calibrate.weight_only import WEIGHT_ONLY_FORMATS
from ..presets import GiB, MiB, Preset, get_preset
from ..step1x_ref.configs import get_config
from ..step1x_ref.imaging import edit_size
from .generation import Mode, generation_activations
from .plan import CUDA_CONTEXT, StagePeak, stage_activations
from .stages import build_stage
from .tracer import resident_bytes
from .weights import dit_bytes, mllm_bytes

CUBLAS_WORKSPACE = 32 * MiB
CUBLASLT_WORKSPACE = 32 * MiB
CUDNN_WORKSPACE = 256 * MiB
CUDNN_STAGES = ("vae_encoder", "dit", "vae_decoder")
FRAGMENTATION = 0.10
FRAGMENTATION_MIN = 256 * MiB
HOST_PROCESS = 4 * GiB  # Python, torch and the CUDA runtime's host side, images, one layer of load staging
@dataclass(frozen=True)
class StageBytes:
    name: str
    weights: int  # weights on the device while this stage runs
    activations: int
    streaming: int  # streamed blocks in flight and the dequantization scratch
    graph_pools: int
    workspaces: int
    context: int
    fragmentation: int

    @property
    def total(self) -> int:
        return (self.weights + self.activations + self.streaming + self.graph_pools + self.workspaces + self.context
                + self.fragmentation)


@dataclass(frozen=True)
class PresetPlan(StagePeak):
    preset: Preset
    mode: Mode
    width: int
    height: int
    stages: list[StageBytes] = field(default_factory=list)
    host_bytes: int = 0
    pcie_bytes: int = 0  # per edit
    weights: dict[str, int] = field(default_factory=dict)  # the whole MLLM, DiT, VAE in the preset's formats

    def fits(self) -> bool:
        return self.total <= self.preset.budget_bytes

    def as_json(self) -> dict:
        return {"preset": asdict(self.preset), "mode": asdict(self.mode), "width": self.width, "height": self.height,
                "stages": [asdict(s) | {"total": s.total} for s in self.stages], "total_bytes": self.total,
                "total_gib": round(self.total / GiB, 3), "peak_stage": self.peak_stage,
                "budget_bytes": self.preset.budget_bytes, "fits": self.fits(), "host_bytes": self.host_bytes,
                "pcie_bytes_per_edit": self.pcie_bytes, "weights": self.weights}


@functools.lru_cache(maxsize=64)
def traced_activations(model: str, name: str, width: int, height: int, recipe: str, batch: int) -> int:
    """A stage's activation peak as `plan.make_plan` traces it (cached: presets share stages)."""
    stage = build_stage(name, get_config(model), width, height, dtype=torch.bfloat16, quant=recipe,
                        weight_only=WEIGHT_ONLY_FORMATS["int8"], mllm_quant=WEIGHT_ONLY_FORMATS["int8"], batch=batch)
    return stage_activations(stage)


def _margin(transient: int) -> int:
    return max(FRAGMENTATION_MIN, int(FRAGMENTATION * transient))


def make_preset_plan(preset: str | Preset, mode: Mode | None = None, size_level: int = 1024) -> PresetPlan:
    """Every byte `preset` holds on the device per stage of an edit of a square image at `size_level`."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    mode = mode or Mode()
    w, h = edit_size(size_level, size_level, size_level)
    recipe = p.dit_format if p.dit_format in ("fp8", "int8-sq") else "fp8"  # 4-bit blocks compute as fp8 W8A8
    dit = dit_bytes(mode.model, p.dit_format)
    mllm = mllm_bytes(mode.model, p.mllm_format, mode.generates)
    vae = sum(resident_bytes(build_stage(half, get_config(mode.model), 64, 64, dtype=torch.float32, quant=None,
                                         weight_only=None, mllm_quant=None).module)
              for half in ("vae_encoder", "vae_decoder"))
    streamed = dit.blocks[p.resident_blocks:] if p.dit_placement == "stream" else ()
    dit_always = dit.total if p.dit_placement == "resident" else 0
    dit_in_stage = dit.total - sum(streamed)
    mllm_always = mllm if p.mllm_placement == "resident" else 0
    in_flight = 0
    if streamed:
        in_flight = (p.prefetch + 1) * max(streamed) + (dit.largest_linear_bf16 if "int4" in p.dit_format else 0)
    dit_act = traced_activations(mode.model, "dit", w, h, recipe, 2 * p.max_batch)
    pools = dit_act if p.cuda_graphs else 0  # one cached size (a preset plans one resolution)
    names = ["mllm_generate"] if mode.generates else []
    names += ["mllm", "vae_encoder", "dit", "vae_decoder"]
    stages = []
    for name in names:
        if name == "mllm_generate":
            act = generation_activations(mode.model)
        else:
            act = dit_act if name == "dit" else traced_activations(mode.model, name, w, h, "fp8", 2)
        weights = vae + (dit_in_stage if name == "dit" else dit_always)
        weights += mllm if name.startswith("mllm") and p.mllm_placement == "swap" else mllm_always
        streaming = in_flight if name == "dit" else 0
        held = max(pools - act, 0) if name == "dit" else pools  # the DiT's activations live in a pool
        workspaces = CUBLAS_WORKSPACE + CUBLASLT_WORKSPACE + (CUDNN_WORKSPACE if name in CUDNN_STAGES else 0)
        stages.append(StageBytes(name, weights, act, streaming, held, workspaces, CUDA_CONTEXT,
                                 _margin(act + held + streaming)))
    pinned = (mllm if p.mllm_placement == "swap" else 0) + (dit.total if p.dit_placement != "resident" else 0)
    candidates = mode.reflect * w * h * 3  # the rounds' edited images (RGB, on the host)
    pcie = (mllm * mode.mllm_entries if p.mllm_placement == "swap" else 0)
    if p.dit_placement != "resident":  # the DiT's stage entry, then each streamed block once per DiT call
        pcie += mode.dit_runs * (dit.total - sum(streamed) + sum(streamed) * mode.steps * mode.calls_per_step)
    return PresetPlan(p, mode, w, h, stages, pinned + HOST_PROCESS + candidates, pcie,
                      {"mllm": mllm, "dit": dit.total, "vae": vae, "dit_streamed": sum(streamed)})


def table(plan: PresetPlan, projections: list) -> str:
    """The plan as text: the preset, one row per stage (GiB), the fit, host RAM, PCIe and the rooflines."""
    p, m = plan.preset, plan.mode
    modes = (" thinking" if m.think else "") + (f", {m.reflect} reflection rounds" if m.reflect else "")
    streamed = (f" ({p.resident_blocks} blocks resident, the rest streamed {p.prefetch} ahead)"
                if p.dit_placement == "stream" else "")
    head = [f"preset {p.name} ({p.cards}: {p.card_mib} MiB; budget 95 % = {p.budget_bytes / GiB:.2f} GiB)",
            f"{m.model}{modes} {plan.width}x{plan.height}, {m.steps} steps, batch {p.max_batch} (CFG rows "
            f"{2 * p.max_batch}); DiT {p.dit_format} {p.dit_placement}{streamed}; MLLM {p.mllm_format} "
            f"{p.mllm_placement} (in pinned host memory while the DiT runs); "
            f"{'CUDA graphs' if p.cuda_graphs else 'no CUDA graphs'}"]
    cols = ("weights", "activations", "streaming", "graph_pools", "workspaces", "context", "fragmentation")
    names = ("weights", "activ.", "streaming", "pools", "workspace", "context", "fragment.")
    rows = [f"{'stage':<14}" + "".join(f"{c:>10}" for c in names) + f"{'total':>10}  (GiB)"]
    rows += [f"{s.name:<14}" + "".join(f"{getattr(s, c) / GiB:10.2f}" for c in cols) + f"{s.total / GiB:10.2f}"
             for s in plan.stages]
    verdict = "fits" if plan.fits() else "DOES NOT FIT"
    tail = [f"peak: {plan.total / GiB:.2f} GiB during {plan.peak_stage} "
            f"({100 * plan.total / p.card_bytes:.1f} % of the card): {verdict}",
            f"host RAM: {plan.host_bytes / GiB:.1f} GiB (pinned weights, the process {HOST_PROCESS / GiB:.0f} GiB, "
            f"candidate images)",
            f"PCIe per edit: {plan.pcie_bytes / 1e9:.1f} GB",
            "projected s/edit, a roofline from stated datasheet rates (a floor, not a measurement): "
            + "; ".join(f"{x.card} {x.seconds:.1f} (all resident {x.resident_seconds:.1f})" for x in projections)]
    return "\n".join([*head, *rows, *tail])
