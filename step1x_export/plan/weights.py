"""The device bytes of each part of the model in any preset's storage format, from meta models.

8-bit layers are counted exactly as the runtime holds them (the plan's swapped meta modules, scales and
SmoothQuant vectors included); a 4-bit format replaces each 8-bit layer's weight and per-channel scale by
the 4-bit weight and its group scales (`presets.WeightFormat`), everything else unchanged. The DiT is
split into its blocks (what streaming moves) and the rest (embedders, final layer, connector: kept
on the device by a streamed DiT).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..calibrate.int4 import int4_group
from ..calibrate.weight_only import WEIGHT_ONLY_FORMATS
from ..presets import FORMATS, WeightFormat
from ..step1x_ref.configs import get_config
from .stages import build_stage
from .tracer import resident_bytes


def _eight_bit_layers(module: nn.Module) -> list[nn.Module]:
    """The 8-bit Linears (W8A8 or weight-only) of `module`: an 8-bit `weight` and a `weight_scale`."""
    return [m for m in module.modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.element_size() == 1
            and hasattr(m, "weight_scale")]


def format_bytes(fmt: WeightFormat, out_features: int, in_features: int, group: int | None = None) -> int:
    """One Linear's weight and scales (and zeros) stored as `fmt` (no bias); `group`: the group size the layer
    takes where `fmt.group` does not divide its width."""
    group = group or fmt.group
    groups = out_features * (math.ceil(in_features / group) if group else 1)
    return out_features * in_features * fmt.bits // 8 + groups * (fmt.scale_bytes + fmt.zero_bytes)


def bytes_as(module: nn.Module, fmt: WeightFormat) -> int:
    """`module`'s resident bytes with its 8-bit Linears stored as `fmt` (8-bit formats: as built). A 4-bit
    format takes each layer's group as the runtime does (`calibrate.int4.int4_group`): a layer no group
    divides stays 8-bit (Qwen2.5-VL's vision MLP down projections, 3420 wide)."""
    total = resident_bytes(module)
    if fmt.bits == 8:
        return total
    for m in _eight_bit_layers(module):
        n, k = m.weight.shape
        group = int4_group(k, fmt.group) if fmt.bits == 4 else fmt.group
        if fmt.bits == 4 and group is None:
            continue
        total += format_bytes(fmt, n, k, group) - m.weight.nbytes - m.weight_scale.nbytes
    return total


@dataclass(frozen=True)
class DiTBytes:
    blocks: tuple[int, ...]  # double blocks, then single blocks, in the preset's format
    rest: int  # embedders, final layer, connector (8-bit weight-only connector, as the 24gb layout)
    largest_linear_bf16: int  # one dequantization scratch: the largest Linear's weight in bf16

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.rest


@functools.lru_cache(maxsize=16)
def dit_bytes(model: str, fmt_name: str) -> DiTBytes:
    """The DiT (connector included) with its W8A8 default selection in `fmt_name`'s recipe (fp8 / int8-sq;
    a 4-bit format: fp8's layout with 4-bit weights) and the modulation and connector weight-only int8."""
    recipe = fmt_name if fmt_name in ("fp8", "int8-sq") else "fp8"
    stage = build_stage("dit", get_config(model), 256, 256, dtype=torch.bfloat16, quant=recipe,
                        weight_only=WEIGHT_ONLY_FORMATS["int8"], mllm_quant=None)
    fmt = FORMATS[fmt_name]
    dit = stage.module
    blocks = [*dit.double_blocks, *dit.single_blocks]
    block_bytes = tuple(bytes_as(b, fmt) for b in blocks)
    largest = max(m.weight.numel() for m in _eight_bit_layers(dit)) * 2
    return DiTBytes(block_bytes, resident_bytes(dit) - sum(resident_bytes(b) for b in blocks), largest)


@functools.lru_cache(maxsize=8)
def mllm_bytes(model: str, fmt_name: str, lm_head: bool) -> int:
    """Qwen2.5-VL's weight-only layers in `fmt_name`, the LM head kept (`lm_head`: text generation) or not."""
    cfg = get_config(model)
    stage = build_stage("mllm", cfg, 256, 256, dtype=torch.bfloat16, quant=None, weight_only=None,
                        mllm_quant=WEIGHT_ONLY_FORMATS["int8"])
    fmt = FORMATS[fmt_name]
    total = bytes_as(stage.module, fmt)
    if lm_head:  # dropped by the plan's stage (the embedder never runs it); generation needs it
        text = stage.module.config.get_text_config()
        total += format_bytes(fmt, text.vocab_size, text.hidden_size)
    return total
