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

What the runtime runs of it (`RuntimeOptions.preset`): resident 8-bit layers, the batch and the graph setting;
a `stream` placement as DiT block streaming (`RuntimeOptions.resident_blocks` / `prefetch_blocks`); a 4-bit
MLLM as `mllm_quant="int4"`; 4-bit DiT blocks from a 4-bit checkpoint (`step1x-export quantize --int4-layers`),
which `--quant` loads; a `swap` placement as stage swapping from pinned host memory
(`sequential_load="host"`: each stage read from disk once per process; the runtime swaps every stage alike, so
a DiT planned resident is swapped too). `runtime_gaps` names what a preset asks for that the runtime lacks
(today: nothing).
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
    """How a quantized Linear's weight is stored: `bits` per weight, one scale of `scale_bytes` (and a zero of
    `zero_bytes`) per output channel (group 0) or per `group` consecutive input weights of a row; `mllm_quant`:
    the runtime's name for it as the MLLM's weight-only format (None: the runtime has no such MLLM format)."""

    name: str
    bits: int
    group: int = 0  # 0: one scale per output channel
    scale_bytes: int = 4
    zero_bytes: int = 0
    mllm_quant: str | None = None


# int4 group-wise as the runtime stores it (`calibrate/int4.py`, torch's W4A16 format): 128 weights share one
# bf16 scale and one bf16 zero: 4.25 bits, 0.531 bytes a weight. A layer whose input width 128 does not divide
# takes a group of 64 or 32, or stays 8-bit where neither divides (`plan/weights.py` counts each as stored).
FORMATS = {
    "bf16": WeightFormat("bf16", 16, scale_bytes=0),
    "int8": WeightFormat("int8", 8, mllm_quant="int8"),  # weight-only, a float32 scale per output channel
    "fp8": WeightFormat("fp8", 8),  # W8A8 (the calibration recipe's layers), per-channel float32 scales
    "int8-sq": WeightFormat("int8-sq", 8),
    "int4-g128": WeightFormat("int4-g128", 4, group=128, scale_bytes=2, zero_bytes=2, mllm_quant="int4"),
}


@dataclass(frozen=True)
class Preset:
    """One card size's configuration (see the module docstring for the placements)."""

    name: str
    card_mib: int  # the card's total memory as nvidia-smi reports it
    cards: str
    dit_format: str  # the DiT blocks' W8A8 recipe (fp8 / int8-sq) or their 4-bit storage (int4-g128)
    dit_placement: str
    mllm_format: str  # weight-only: int8 or int4-g128 (the runtime's mllm_quant "int8" / "int4")
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
    def mllm_quant(self) -> str | None:
        """The runtime's `mllm_quant` for this preset's MLLM format ("int8", "int4")."""
        return FORMATS[self.mllm_format].mllm_quant

    @property
    def dit_int4(self) -> bool:
        """Whether the DiT's blocks are planned in 4 bits (a 4-bit checkpoint: `quantize --int4-layers`)."""
        return FORMATS[self.dit_format].bits == 4

    def runtime_gaps(self) -> list[str]:
        """What this preset asks for that the runtime does not have (empty: it runs today)."""
        return [] if self.mllm_quant is not None else [f"the MLLM in {self.mllm_format}"]

    @property
    def sequential_load(self) -> bool | str:
        """`RuntimeOptions.sequential_load`: a swapped stage waits in (pinned) host memory, read from disk once per
        process ("host"). The runtime swaps every stage alike, so a DiT planned resident is swapped too: less on
        the device than the plan counts, one host-to-device copy of its weights per edit more."""
        return "host" if "swap" in (self.mllm_placement, self.dit_placement) else False

    @property
    def resident_blocks_option(self) -> int | None:
        """`RuntimeOptions.resident_blocks` for this preset: None (every block resident) unless the DiT streams."""
        return self.resident_blocks if self.dit_placement == "stream" else None


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
                   planned_gib=(6.61, 7.11)),
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


# What makes the 8gb preset's DiT: its blocks in 4 bits, the modulation and connector 8-bit weight-only (default).
INT4_DIT_COMMAND = ("step1x-export quantize --model-dir DIR --int4-layers 'double_blocks.*' "
                    "--int4-layers 'single_blocks.*' --out DIT_INT4.safetensors")


def check_dit_checkpoint(name: str, int4_layers: int | None, path: object) -> None:
    """Raise when preset `name` plans 4-bit DiT blocks and the DiT at `path` has none (`int4_layers`: its 4-bit
    layers; None: `path` is no quantized checkpoint), naming the command that makes one."""
    if get_preset(name).dit_int4 and not int4_layers:
        got = "no quantized checkpoint" if int4_layers is None else "a checkpoint without 4-bit layers"
        raise ValueError(f"preset {name} plans the DiT's blocks in 4 bits; --quant {path} is {got}: make one with "
                         f"`{INT4_DIT_COMMAND}`")


def refuse_gaps(name: str) -> None:
    """Raise when preset `name` needs runtime pieces that do not exist yet, naming them."""
    gaps = get_preset(name).runtime_gaps()
    if gaps:
        ready = ", ".join(p.name for p in PRESETS.values() if not p.runtime_gaps())
        raise ValueError(f"preset {name} needs {' and '.join(gaps)}, which the runtime does not have yet; "
                                  f"presets that run today: {ready} (`step1x-export plan --preset {name}` plans it)")
