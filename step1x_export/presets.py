"""The memory presets as plain data: what each keeps on the device, in which format, and what runs today.

A preset names a card size and says, per part of the model, where its weights live while another part
runs and in which storage format; the memory plan (`plan/preset_plan.py`) counts every byte of it at
1024^2 and holds each total under 95 % of the card (tests/test_presets_plan.py), and `RuntimeOptions.preset`
applies it to a runtime. Placements:

- ``resident``: on the device for the whole process;
- ``swap``: in pinned host memory, copied to the device for its own stage and dropped after it (the
  host copy stays, so nothing is re-read from disk);
- ``stream`` (the DiT only): swapped as a stage, but of its blocks only `resident_blocks` come in with the
  embedders, final layer and connector at the stage's start; every other block is copied from pinned host
  memory `prefetch` blocks ahead of its use, on a side stream, once per DiT call, and freed after it.

Where the MLLM lives while the DiT runs: in pinned host memory, in every preset (swapped). All resident
(8-bit MLLM and DiT) is 22.8 GiB at 1024^2 before workspaces and a fragmentation margin: past 95 % of a
24 GiB card; and v1.2's thinking and judging add the LM head and a KV cache.

What the runtime has today: resident 8-bit layers, sequential loading, the batch and the graph setting.
A `swap` placement runs as sequential loading until stage swapping lands (the same or less device memory;
each stage is re-read from disk per edit, which swapping will avoid); a `stream` placement or a 4-bit format
is refused by `RuntimeOptions`, naming what is missing (`runtime_gaps`).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
MiB = 2**20
# The CUDA context with lazily loaded kernels and torch's handles: not measured here (no GPU); 0.3-0.5 GiB is
# what a CUDA 12 context usually takes. `benchmarks/first_light.sh` measures it; replace this by that figure.
CUDA_CONTEXT = GiB // 2

PLACEMENTS = ("resident", "swap", "stream")


@dataclass(frozen=True)
class WeightFormat:
    """How a quantized Linear's weight is stored: `bits` per weight, one scale of `scale_bytes` per output
    channel (group 0) or per `group` consecutive input weights of a row."""

    name: str
    bits: int
    group: int = 0  # 0: one scale per output channel
    scale_bytes: int = 4


# int4 group-wise: 128 weights share one bf16 scale (symmetric, no zero point), as the offload helper's
# 4-bit checkpoints store them: 0.516 bytes a weight. GPTQ / AWQ / HQQ and torchao's int4 layouts use the
# same group size; a bf16 scale is what their kernels read.
FORMATS = {
    "bf16": WeightFormat("bf16", 16, scale_bytes=0),
    "int8": WeightFormat("int8", 8),  # weight-only, a float32 scale per output channel
    "fp8": WeightFormat("fp8", 8),  # W8A8 (the calibration recipe's layers), per-channel float32 scales
    "int8-sq": WeightFormat("int8-sq", 8),
    "int4-g128": WeightFormat("int4-g128", 4, group=128, scale_bytes=2),
}


@dataclass(frozen=True)
class Preset:
    """One card size's configuration (see the module docstring for the placements)."""

    name: str
    card_mib: int  # the card's total memory as nvidia-smi reports it
    cards: str
    dit_format: str  # the DiT blocks' W8A8 recipe (fp8 / int8-sq) or their 4-bit storage (int4-g128)
    dit_placement: str
    mllm_format: str  # weight-only: int8 (8-bit, runs today) or int4-g128
    mllm_placement: str
    resident_blocks: int = 0  # streamed DiT: blocks kept on the device (double blocks first)
    prefetch: int = 0  # streamed DiT: blocks copied ahead of the one computing
    max_batch: int = 1  # edits per DiT call (each is CFG batch 2)
    cuda_graphs: bool = False  # a captured step keeps a pool of the DiT's activations between edits
    # The plan's totals at 1024^2 (GiB): v1.0 / v1.1, and v1.2 with thinking and 2 reflection rounds; what the
    # runtime compares with the device's free memory at load (tests/test_plan.py keeps them the plan's).
    planned_gib: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for part in ("dit", "mllm"):
            if getattr(self, f"{part}_placement") not in PLACEMENTS:
                raise ValueError(f"{self.name}: unknown {part} placement {getattr(self, f'{part}_placement')!r}")
            if getattr(self, f"{part}_format") not in FORMATS:
                raise ValueError(f"{self.name}: unknown {part} format {getattr(self, f'{part}_format')!r}")
        if self.mllm_placement == "stream":
            raise ValueError(f"{self.name}: the MLLM cannot stream (its generation reads every weight per token)")
        if self.dit_placement == "stream" and self.prefetch < 1:
            raise ValueError(f"{self.name}: a streamed DiT needs prefetch >= 1, got {self.prefetch}")

    @property
    def card_bytes(self) -> int:
        return self.card_mib * MiB

    @property
    def budget_bytes(self) -> int:
        """95 % of the card: what the plan's total must stay under."""
        return int(0.95 * self.card_bytes)

    @property
    def mllm_quant(self) -> str:
        """The runtime's `mllm_quant` this preset asks for (its 8-bit weight-only format; 4-bit is refused first)."""
        return self.mllm_format

    def runtime_gaps(self) -> list[str]:
        """What this preset needs that the runtime does not have yet (empty: it runs today)."""
        gaps = []
        if self.dit_placement == "stream":
            gaps.append("DiT block streaming from pinned host memory")
        if "int4" in self.dit_format or "int4" in self.mllm_format:
            gaps.append("4-bit weight storage")
        return gaps

    @property
    def sequential_load(self) -> bool:
        """Until stage swapping lands, a swapped stage is loaded for its turn and freed after."""
        return "swap" in (self.mllm_placement, self.dit_placement)


# Cards (nvidia-smi's total): 4090 / A5000 24564 MiB and L4 / A10 23030 MiB (`/work/shared/PERF.md`);
# 16376 (4080, 4060 Ti 16 GB), 12282 (4070), 8188 (4060) MiB as those cards report them.
# The DiT's W8A8 recipe is FP8 where every named card has FP8 GEMMs (Ada, Hopper); A5000 and A10 (Ampere)
# run the same preset from an int8-sq checkpoint (the same bytes plus a K-vector per layer).
PRESETS: dict[str, Preset] = {
    "24gb": Preset("24gb", 24564, "RTX 4090, RTX A5000", dit_format="fp8", dit_placement="resident",
                   mllm_format="int8", mllm_placement="swap",
                   planned_gib=(20.82, 21.81)),
    "22gb": Preset("22gb", 23030, "L4, A10 (about 22.5 GiB usable)", dit_format="fp8", dit_placement="swap",
                   mllm_format="int8", mllm_placement="swap",
                   planned_gib=(15.61, 16.11)),
    "16gb": Preset("16gb", 16376, "RTX 4080, RTX 4060 Ti 16 GB", dit_format="fp8", dit_placement="stream",
                   mllm_format="int8", mllm_placement="swap", resident_blocks=40, prefetch=2,
                   planned_gib=(13.80, 14.30)),
    "12gb": Preset("12gb", 12282, "RTX 4070, RTX 3060 12 GB", dit_format="fp8", dit_placement="stream",
                   mllm_format="int8", mllm_placement="swap", resident_blocks=14, prefetch=2,
                   planned_gib=(10.05, 10.56)),
    "8gb": Preset("8gb", 8188, "RTX 4060, RTX 3070", dit_format="int4-g128", dit_placement="stream",
                  mllm_format="int4-g128", mllm_placement="swap", resident_blocks=8, prefetch=2,
                   planned_gib=(6.55, 7.06)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def planned_bytes(preset: Preset, reason_edit: bool) -> int:
    """The preset's planned peak at 1024^2: v1.2 (`reason_edit`) with thinking and 2 reflection rounds."""
    return int(preset.planned_gib[reason_edit] * GiB)


def check_fits(name: str, free_bytes: int, reason_edit: bool, device: str) -> None:
    """Raise, naming the presets that fit, when preset `name`'s plan exceeds `free_bytes` + the CUDA context
    (read after the context exists, so the context is already taken out of the free memory)."""
    chosen = get_preset(name)
    room = free_bytes + CUDA_CONTEXT
    if planned_bytes(chosen, reason_edit) <= room:
        return
    fitting = [p.name for p in PRESETS.values() if planned_bytes(p, reason_edit) <= room]
    mode = "v1.2 with thinking and 2 reflection rounds" if reason_edit else "v1.1"
    advice = f"--preset {fitting[0]} fits" if fitting else "no preset fits (free memory held by other processes?)"
    raise ValueError(f"preset {name} plans {planned_bytes(chosen, reason_edit) / GiB:.2f} GiB at 1024^2 ({mode}); "
                     f"{device} has {free_bytes / GiB:.2f} GiB free after its CUDA context: {advice}")


def refuse_gaps(name: str) -> None:
    """Raise when preset `name` needs runtime pieces that do not exist yet, naming them."""
    gaps = get_preset(name).runtime_gaps()
    if gaps:
        ready = ", ".join(p.name for p in PRESETS.values() if not p.runtime_gaps())
        raise ValueError(f"preset {name} needs {' and '.join(gaps)}, which the runtime does not have yet; "
                                  f"presets that run today: {ready} (`step1x-export plan --preset {name}` plans it)")
