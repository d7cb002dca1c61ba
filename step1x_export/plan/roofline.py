"""Projected seconds per edit from stated card rates: a roofline (a lower bound), never a measurement.

Each piece of an edit takes the longest of its compute at the card's datasheet peak (dense, no sparsity)
and the bytes it must move at the stated rate:

- the DiT per call: its GEMMs at the rate of their format (FP8 W8A8 and 4-bit blocks dequantized into FP8:
  the FP8 rate; int8-sq: the INT8 rate; bf16 otherwise) plus attention at the bf16 rate, against the
  streamed blocks' bytes over PCIe (the copies overlap the compute on a side stream);
- the MLLM: each prefill at the bf16 rate; each generated token reads every weight once (memory-bound,
  at the card's memory bandwidth; a W8A16 / W4A16 kernel reads the stored bytes);
- the VAE (fp32): its FLOPs at half the bf16 rate (TF32 tensor cores);
- each swap: its bytes over PCIe, not overlapped (the stage cannot start before its weights are in).

The resident projection is the same edit with every weight on the device (no swaps, no streaming):
what streaming costs is the difference. Real steps reach about 60 % of these peaks (`/work/shared/PERF.md`:
an eager bf16 step ran at 59 % of its floor on an H200), so read both columns as floors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..calibrate.recipes import select_layers
from ..choices import MODULATION
from ..runtime.engines.buffers import edit_dims
from ..specs import dim_ranges
from ..step1x_ref.configs import get_config
from .generation import JUDGE_IMAGE_TOKENS, JUDGE_TEXT_TOKENS, MAX_NEW_TOKENS
from .preset_plan import PresetPlan
from .stages import build_stage


@dataclass(frozen=True)
class Card:
    name: str
    bf16: float  # dense tensor FLOP/s, FP32 accumulate
    fp8: float
    int8: float
    memory: float  # bytes/s
    pcie: float  # bytes/s from pinned host memory


# Datasheet peaks (dense): RTX 4090 (Ada whitepaper: FP32-accumulate rates), L4, H100 SXM. PCIe: ~25 GB/s
# for gen 4 x16 and ~50 GB/s for gen 5 x16 from pinned memory (`/work/shared/PERF.md`).
CARDS = {
    "4090": Card("RTX 4090", 165.2e12, 330.3e12, 660.6e12, 1008e9, 25e9),
    "L4": Card("L4", 121e12, 242.5e12, 242.5e12, 300e9, 25e9),
    "H100": Card("H100 SXM", 989e12, 1979e12, 1979e12, 3350e9, 50e9),
}


@dataclass(frozen=True)
class Projection:
    card: str
    seconds: float  # the preset as planned (swaps and streaming)
    resident_seconds: float  # every weight on the device


@functools.lru_cache(maxsize=8)
def dit_flops(model: str, width: int, height: int, rows: int) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of one DiT call over `rows` sequences: 2 x tokens x the per-token weights of
    the blocks (the modulation Linears act on one vector per row: left out), 4 x L^2 x width per block
    (`/work/shared/PERF.md`'s count: 2.28e14 + 1.09e14 per v1.1 step at 1024^2)."""
    cfg = get_config(model)
    with torch.device("meta"):
        from ..step1x_ref.dit.model import Step1XEdit

        dit = Step1XEdit(cfg)
    names = [n for n, m in dit.named_modules() if isinstance(m, nn.Linear) and n.startswith(("double_", "single_"))]
    modulation = set(select_layers(names, MODULATION, ()))  # full names: the patterns need the block's prefix
    # A double block's text and image streams have the same shapes and each token passes through one of them.
    per_token = sum(dit.get_submodule(n).weight.numel() for n in names if n not in modulation and ".txt_" not in n)
    seq = edit_dims(cfg, width, height, batch=rows)["seq_len"]
    blocks = len(dit.double_blocks) + len(dit.single_blocks)
    return 2.0 * rows * seq * per_token, 4.0 * rows * seq**2 * cfg.dit.hidden_size * blocks


@functools.lru_cache(maxsize=8)
def vae_flops(model: str, width: int, height: int) -> float:
    total = 0
    for name in ("vae_encoder", "vae_decoder"):
        stage = build_stage(name, get_config(model), width, height, dtype=torch.float32, quant=None,
                            weight_only=None, mllm_quant=None)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            for forward, inputs in stage.passes:
                forward(*inputs)
        total += counter.get_total_flops()
    return float(total)


def _gemm_rate(card: Card, fmt: str) -> float:
    return card.int8 if fmt == "int8-sq" else card.fp8 if fmt in ("fp8", "int4-g128") else card.bf16


def project(plan: PresetPlan, card: Card, mllm_params: float = 8.3e9) -> Projection:  # Qwen2.5-VL-7B
    """Seconds per edit of `plan` on `card`, and with every weight resident (both rooflines)."""
    p, mode = plan.preset, plan.mode
    rows = 2 * p.max_batch // mode.calls_per_step
    gemm, attention = dit_flops(mode.model, plan.width, plan.height, rows)
    compute = gemm / _gemm_rate(card, p.dit_format) + attention / card.bf16
    calls = mode.steps * mode.calls_per_step * mode.dit_runs
    streamed = plan.weights["dit_streamed"] / card.pcie
    dit_resident, dit_planned = calls * compute, calls * max(compute, streamed)
    vae = mode.dit_runs * vae_flops(mode.model, plan.width, plan.height) / (card.bf16 / 2)
    encode_tokens = 2 * dim_ranges(get_config(mode.model))["llm_seq"][2]  # cond + uncond, the longest prompts
    prefill = mode.dit_runs * 2 * mllm_params * encode_tokens / card.bf16
    judge_prompt = 2 * JUDGE_IMAGE_TOKENS + JUDGE_TEXT_TOKENS
    generate = mode.generate_calls * (2 * mllm_params * judge_prompt / card.bf16
                                      + MAX_NEW_TOKENS * plan.weights["mllm"] / card.memory)
    swaps = (plan.pcie_bytes - plan.weights["dit_streamed"] * calls) / card.pcie
    resident = dit_resident + vae + prefill + generate
    return Projection(card.name, resident - dit_resident + dit_planned + swaps, resident)
