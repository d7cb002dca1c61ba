"""The W8A8 GPU kernels' maths (run on CPU), their selection, and the weight-only 8-bit layers' error (tiny model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from step1x_export.calibrate import qlinear
from step1x_export.calibrate.collect import InputStats
from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qcheckpoint import MODULATION, WEIGHT_ONLY_DEFAULT
from step1x_export.calibrate.qlinear import Kernel, QuantLinear, UnsupportedKernelError, select_kernel
from step1x_export.calibrate.recipes import RECIPES, layer_scales, select_layers
from step1x_export.calibrate.weight_only import WeightOnlyLinear, quantize_weights_
from step1x_export.runtime.engines.mllm import prepare_mllm
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.pipeline import sampling_inputs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def layer_and_input():
    torch.manual_seed(0)
    linear = nn.Linear(256, 384).bfloat16()
    x = (torch.randn(300, 256) * torch.linspace(0.1, 4, 256)).bfloat16()  # outlier channels, as in the DiT
    return linear, x


@pytest.fixture
def cuda_gemm_results(monkeypatch):
    """The 8-bit GEMMs as the CUDA kernels compute them (exact int32 sums; fp8 products summed in float32),
    in place of the CPU's: oneDNN's int8 GEMM saturates int16 pair sums on CPUs without VNNI / AMX (7% error
    at AVX2, exact with AMX) and has no fp8 GEMM below AVX-512. The kernels themselves are checked on a GPU
    (benchmarks/check_quant.py); this checks the maths around them."""

    def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.long() @ b.long()).int()

    def scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype, use_fast_accum=False):
        y = (a.float() @ b.float()) * scale_a.float() * scale_b.float()
        return (y if bias is None else y + bias.float()).to(out_dtype)

    monkeypatch.setattr(torch, "_int_mm", int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)


@pytest.mark.isa  # bf16 activation quantization and epilogue: ATen's kernels, per CPU
@pytest.mark.parametrize(("recipe", "kernel"), [("fp8", Kernel.SCALED_MM), ("int8-sq", Kernel.INT_MM)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_gpu_kernel_maths_match_the_exact_emulation(layer_and_input, cuda_gemm_results, recipe, kernel,
                                                    per_channel):
    """The GPU paths (bf16 activation quantization, bf16 GEMM output with the bias in the epilogue) run on CPU
    too: their error against the float layer stays within 10% of the exact Q/DQ emulation's."""
    linear, x = layer_and_input
    s = layer_scales(linear, InputStats(x.float().abs().amax(0)), RECIPES[recipe], alpha=0.5, per_channel=per_channel)
    q = QuantLinear.from_linear(linear, RECIPES[recipe].fmt, input_scale=s.input_scale, weight_scale=s.weight_scale,
                                smooth=s.smooth)
    ref = nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    emulated = q.use_kernel(Kernel.EMULATE)(x)
    got = q.use_kernel(kernel)(x)
    assert got.dtype == torch.bfloat16 and q.kernel is kernel and f"kernel={kernel.value}" in repr(q)
    # Measured (this test's layer): fp8 3.68% (emulation) vs 3.70% (kernel); int8-sq 1.08% vs 1.13%.
    assert rel_err(got, ref) <= 1.1 * rel_err(emulated, ref)


def test_fp8_is_refused_on_a_gpu_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda")
    with pytest.raises(UnsupportedKernelError, match="A100.*8.0.*int8-sq"):
        select_kernel(QuantFormat.FP8_E4M3, cuda, 64, 64)
    assert select_kernel(QuantFormat.INT8, cuda, 64, 64) is Kernel.INT_MM
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert select_kernel(QuantFormat.FP8_E4M3, cuda, 64, 64) is Kernel.SCALED_MM
    assert select_kernel(QuantFormat.FP8_E4M3, cuda, 64, 64, torch.float32) is Kernel.EMULATE  # rowwise needs bf16


def test_kernel_is_chosen_when_built_or_moved_never_in_forward(layer_and_input, monkeypatch):
    linear, x = layer_and_input
    q = QuantLinear.from_linear(linear, QuantFormat.FP8_E4M3, input_scale=torch.tensor(0.01),
                                weight_scale=torch.full((384,), 1e-3))
    calls = []
    monkeypatch.setattr(qlinear, "select_kernel", lambda *a, **k: calls.append(a) or Kernel.EMULATE)
    q(x)
    assert calls == []
    weight = q.weight.clone()
    q.to("cpu")  # a move re-chooses (once)
    assert len(calls) == 1
    assert q.weight.dtype == torch.float8_e4m3fn and torch.equal(q.weight.view(torch.uint8), weight.view(torch.uint8))


@pytest.mark.parametrize("fmt", [QuantFormat.FP8_E4M3, QuantFormat.INT8])
@pytest.mark.parametrize("cast", [lambda q: q.to(torch.bfloat16), lambda q: q.to("cpu", torch.bfloat16),
                                  lambda q: q.float().bfloat16()])
def test_a_dtype_change_moves_the_8bit_weight_and_scales_and_casts_only_bias_and_output(fmt, cast):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = QuantLinear.from_linear(linear, fmt, input_scale=torch.tensor(0.02), weight_scale=torch.rand(32) * 1e-2 + 1e-3,
                                smooth=torch.rand(64) + 0.5)
    x = torch.randn(5, 64).bfloat16()  # the input the bf16 layer takes, fed to the reference too
    before = {k: v.clone() for k, v in q.state_dict().items()}
    cast(q)
    for name in ("weight", "weight_scale", "input_scale", "smooth_inv"):
        got, want = getattr(q, name), before[name]
        bits = got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        assert got.dtype == want.dtype and torch.equal(*bits), name
    assert q.bias.dtype == torch.bfloat16 and q.out_dtype == torch.bfloat16
    # the layer still computes the same Q/DQ maths: only the bias and the output are rounded to bf16
    fresh = QuantLinear.from_linear(linear, fmt, input_scale=torch.tensor(0.02), weight_scale=before["weight_scale"],
                                    smooth=1 / before["smooth_inv"])
    ref = qlinear._emulate(x.float(), fresh)
    assert rel_err(q(x), ref) < 2**-8  # bf16's unit roundoff, twice (bias, output)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


# Measured on the tiny random model (fp32, "add a hat" + "", a 64x64 noise image): embedding rel. error
# fp8 0.036, int8 0.0091.
@pytest.mark.parametrize(("fmt", "bound"), [("fp8", 0.05), ("int8", 0.012)])
def test_mllm_weight_only_embedding_error(tiny_pipe, image, fmt, bound):
    ref, mask = tiny_pipe.embedder(["add a hat", ""], image)
    embedder = prepare_mllm(copy.deepcopy(tiny_pipe.embedder), fmt)
    model = embedder.model
    assert isinstance(model.lm_head, nn.Identity)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if ".layers." in n or "visual" in n)
    got, got_mask = embedder(["add a hat", ""], image)
    assert torch.equal(got_mask, mask)
    assert 0 < rel_err(got, ref) < bound


# Measured (one DiT forward of the tiny model, t = 0.7, the embedder's output as conditioning):
# modulation only (6 layers): fp8 8.6e-4, int8 1.2e-4; modulation + connector (22 layers): fp8 1.2e-3, int8 1.6e-4.
@pytest.mark.parametrize(("patterns", "fmt", "bound"), [
    (MODULATION, QuantFormat.INT8, 3e-4), (MODULATION, QuantFormat.FP8_E4M3, 2e-3),
    (WEIGHT_ONLY_DEFAULT, QuantFormat.INT8, 4e-4), (WEIGHT_ONLY_DEFAULT, QuantFormat.FP8_E4M3, 3e-3)])
def test_dit_weight_only_modulation_and_connector_error(tiny_pipe, image, patterns, fmt, bound):
    c = tiny_pipe.config
    emb, mask = tiny_pipe.embedder(["add a hat", ""], image)
    noise, pe, _ = sampling_inputs(c, emb.shape[1], 64, 64, seed=0, steps=4)
    img = torch.cat([noise, noise.flip(1)], dim=1).expand(2, -1, -1)
    inputs = {"img": img, "pe": pe, "timestep": torch.tensor([0.7, 0.7]), "llm_embedding": emb, "llm_mask": mask}
    args = [inputs[t.name] for t in dit_spec(c).inputs]
    ref = tiny_pipe.model(*args)
    model = copy.deepcopy(tiny_pipe.model)
    names = select_layers([n for n, m in model.named_modules() if isinstance(m, nn.Linear)], patterns, ())
    quantize_weights_(model, names, fmt)
    assert names and all(isinstance(model.get_submodule(n), WeightOnlyLinear) for n in names)
    err = rel_err(model(*args), ref)
    print(f"dit weight-only {fmt.value} {len(names)} layers: {err:.2e}")
    assert 0 < err < bound
