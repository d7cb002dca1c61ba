"""The card-size presets: every preset's plan within 95 % of its card at 1024^2 for v1.1 and for v1.2 with
thinking and 2 reflection rounds, each term counted as stated, and the figures the runtime reads kept equal
to the plan's."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.weight_only import WeightOnlyLinear
from step1x_export.choices import MEMORY_PRESETS
from step1x_export.cli import main
from step1x_export.plan.generation import Mode, generation_activations, kv_cache_bytes
from step1x_export.plan.preset_plan import (
    CUBLAS_WORKSPACE,
    CUBLASLT_WORKSPACE,
    CUDNN_WORKSPACE,
    FRAGMENTATION_MIN,
    make_preset_plan,
    traced_activations,
)
from step1x_export.plan.roofline import CARDS, dit_flops, project
from step1x_export.plan.weights import bytes_as, dit_bytes, format_bytes, mllm_bytes
from step1x_export.presets import CUDA_CONTEXT, FORMATS, PRESETS, GiB, planned_bytes

MODES = {"v1.1": Mode("v1.1"), "v1.2": Mode("v1.2", think=True, reflect=2)}


@pytest.fixture(scope="module")
def plans():
    """Every preset x mode at 1024^2 (one process: the meta models and traces are shared)."""
    return {(name, mode): make_preset_plan(name, MODES[mode]) for name in PRESETS for mode in MODES}


def test_every_preset_fits_95_percent_of_its_card(plans):
    assert tuple(PRESETS) == MEMORY_PRESETS
    for (name, mode), plan in plans.items():
        card = PRESETS[name].card_mib * 2**20
        assert plan.total <= 0.95 * card, (name, mode, plan.total / GiB)
        # the figure the runtime checks at load is the plan's (2 decimals of GiB)
        assert abs(planned_bytes(PRESETS[name], mode == "v1.2") - plan.total) <= 0.005 * GiB, (name, mode)


def test_each_term_is_counted(plans):
    plan = plans["8gb", "v1.2"]
    names = [s.name for s in plan.stages]
    assert names == ["mllm_generate", "mllm", "vae_encoder", "dit", "vae_decoder"]
    by = {s.name: s for s in plan.stages}
    for s in plan.stages:
        assert s.context == CUDA_CONTEXT and s.fragmentation >= FRAGMENTATION_MIN
        assert s.workspaces == CUBLAS_WORKSPACE + CUBLASLT_WORKSPACE + (CUDNN_WORKSPACE if "vae" in s.name
                                                                        or s.name == "dit" else 0)
        assert s.total == (s.weights + s.activations + s.streaming + s.graph_pools + s.workspaces + s.context
                           + s.fragmentation)
    # streaming: the block computing and `prefetch` arriving, each the largest streamed block, and one 4-bit
    # layer's bf16 dequantization scratch
    p = PRESETS["8gb"]
    dit = dit_bytes("v1.2", p.dit_format)
    streamed = dit.blocks[p.resident_blocks:]
    assert by["dit"].streaming == (p.prefetch + 1) * max(streamed) + dit.largest_linear_bf16
    # the DiT's resident part only during its stage; the MLLM (LM head kept for generation) only during its own
    vae = by["vae_encoder"].weights
    assert by["dit"].weights - vae == dit.total - sum(streamed)
    assert by["mllm_generate"].weights - vae == mllm_bytes("v1.2", "int4-g128", True)
    # generation: the KV cache of the longest judging prompt and 128 new tokens is in the activations
    assert by["mllm_generate"].activations > kv_cache_bytes("v1.2", 2 * 1024 + 2048 + 128)
    assert plans["24gb", "v1.1"].stages[-2].activations == traced_activations("v1.1", "dit", 1024, 1024, "fp8", 2)


def test_pcie_bytes_and_host_ram(plans):
    mllm11, mllm12 = mllm_bytes("v1.1", "int8", False), mllm_bytes("v1.2", "int8", True)
    assert plans["24gb", "v1.1"].pcie_bytes == mllm11  # the MLLM swapped in once; the DiT resident
    assert plans["24gb", "v1.2"].pcie_bytes == 3 * mllm12  # thinking, then after each of 2 judgements
    dit = dit_bytes("v1.1", "fp8")
    assert plans["22gb", "v1.1"].pcie_bytes == mllm11 + dit.total  # both stages swapped
    p = PRESETS["16gb"]
    streamed = sum(dit.blocks[p.resident_blocks:])
    assert plans["16gb", "v1.1"].pcie_bytes == mllm11 + dit.total - streamed + 28 * streamed
    assert plans["22gb", "v1.1"].host_bytes > mllm11 + dit.total  # pinned copies + the process


def test_weight_formats_count_exactly():
    """As the runtime stores them: int4 = a byte per 2 codes, a bf16 scale and a bf16 zero per group (of 128 where
    it divides the width, else 64 or 32; 8-bit where none does); int8 = a byte a weight, a float32 scale a row."""
    from step1x_export.calibrate.int4 import Int4Linear

    assert format_bytes(FORMATS["int4-g128"], 3072, 12288) == 3072 * 12288 // 2 + 3072 * 96 * (2 + 2)
    linear = Int4Linear(12288, 3072, 128, bias=False, dtype=torch.bfloat16, device="meta")  # the runtime's buffers
    held = sum(t.nbytes for t in (linear.weight, linear.weight_scale, linear.weight_zero))
    assert format_bytes(FORMATS["int4-g128"], 3072, 12288) == held
    assert format_bytes(FORMATS["int8"], 3072, 12288) == 3072 * 12288 + 3072 * 4
    model = nn.Sequential(WeightOnlyLinear(256, 64, QuantFormat.INT8, bias=True, dtype=torch.bfloat16,
                                           device="meta"), nn.LayerNorm(64, device="meta"))
    eight = 64 * 256 + 64 * 4 + 64 * 2 + 2 * 64 * 4  # weight, scales, bf16 bias, fp32 LayerNorm
    assert bytes_as(model, FORMATS["int8"]) == eight
    assert bytes_as(model, FORMATS["int4-g128"]) == eight - 64 * 256 - 64 * 4 + 64 * 128 + 64 * 2 * (2 + 2)
    # Qwen2.5-VL's vision MLP down projection (3420 wide): no 4-bit group divides it, the runtime keeps it int8
    vision = WeightOnlyLinear(3420, 1280, QuantFormat.INT8, bias=False, dtype=torch.bfloat16, device="meta")
    assert bytes_as(vision, FORMATS["int4-g128"]) == bytes_as(vision, FORMATS["int8"]) == 1280 * 3420 + 1280 * 4
    assert kv_cache_bytes("v1.2", 1) == 28 * 2 * 4 * 128 * 2  # Qwen2.5-VL-7B: 28 layers, 4 KV heads of 128


def test_roofline_streaming_costs_only_what_compute_cannot_hide(plans):
    """A projection, not a measurement: resident <= planned; the H100's DiT hides 8-bit streaming at 1024^2.
    The DiT's FLOPs are PERF.md's count (each token through one stream of a double block, no modulation)."""
    gemm, attention = dit_flops("v1.1", 1024, 1024, 2)
    assert gemm == pytest.approx(2.28e14, rel=0.005) and attention == pytest.approx(1.09e14, rel=0.005)
    for plan in plans.values():
        for card in CARDS.values():
            x = project(plan, card)
            assert 0 < x.resident_seconds <= x.seconds
    h100 = project(plans["16gb", "v1.1"], CARDS["H100"])
    swaps = (plans["16gb", "v1.1"].pcie_bytes - 28 * plans["16gb", "v1.1"].weights["dit_streamed"]) / 50e9
    assert h100.seconds == pytest.approx(h100.resident_seconds + swaps)


def test_plan_cli_v12_think_reflect_24gb_fits(plans):
    """The v1.2 issue's bound: thinking and 2 reflection rounds with the 24gb preset within 23.0 GiB."""
    run = CliRunner().invoke(main, ["plan", "--version", "v1.2", "--size-level", "1024", "--preset", "24gb", "--think",
                                    "--reflect", "2", "--budget-gib", "23.0", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert out["total_bytes"] == plans["24gb", "v1.2"].total <= 23.0 * GiB and out["fits"]
    assert out["peak_stage"] == "mllm_generate" and set(out["projected_seconds_roofline"]) == {
        "RTX 4090", "L4", "H100 SXM"}
    run = CliRunner().invoke(main, ["plan", "--version", "v1.1", "--think", "--preset", "24gb"])
    assert run.exit_code == 1 and "v1.2 features" in run.output
    # without a card-size preset, a configuration's plan counts the generation too (the LM head kept)
    run = CliRunner().invoke(main, ["plan", "--version", "v1.2", "--think", "--mllm-quant", "int8", "--json"])
    assert run.exit_code == 0, run.output
    stages = {s["name"]: s for s in json.loads(run.output)["stages"]}
    assert list(stages)[0] == "mllm_generate" and stages["mllm_generate"]["weights"] == stages["mllm"]["weights"]
    assert stages["mllm"]["weights"] == mllm_bytes("v1.2", "int8", True)
    assert stages["mllm_generate"]["activations"] == generation_activations("v1.2")
