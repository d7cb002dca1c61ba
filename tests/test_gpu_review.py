"""CPU tests of the GPU path's design: compiles bounded over prompt lengths and shared across runtimes,
graph-safe derived buffers, step-cache memory released with sequential loading, the memory plan's
counted graph pools and context, ring attention's fp32 refusal, TensorRT engine flags and scales."""

from __future__ import annotations

import copy
import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend

from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qlinear import Kernel, QuantLinear, quantize_activation
from step1x_export.cli import main
from step1x_export.precision import Precision
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.runtime.engines import compile as compile_mod
from step1x_export.runtime.engines.compile import BLOCK_LISTS, CompileBackend
from step1x_export.runtime.engines.torch_engine import TorchEngine
from step1x_export.runtime.engines.trt_build import BuildOptions, builder_flags
from step1x_export.runtime.loaders import pipeline_loaders
from step1x_export.runtime.parallel.attention import _kernel
from step1x_export.runtime.step.attention import with_attention
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def tracing_backend(monkeypatch):
    """Fresh per-process backends that trace (dynamo, fullgraph) but hand the graph back uncompiled:
    what is counted is dynamo's compiles, without inductor's C++ builds."""
    def trace_only(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward

    monkeypatch.setattr(CompileBackend, "__call__", trace_only)
    monkeypatch.setattr(compile_mod, "_BACKENDS", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Ten instructions of ten different token counts (v1.2 keeps each branch's text unpadded).
PROMPTS = ["hat", "add a hat", "add a red hat", "make the sky pink", "turn the cat into a small dog",
           'write "OPEN" on the door', "remove the person on the left side", "make it look like an old photo "
           "from the seventies", "replace the background with a beach at sunset and add palm trees",
           "change the season to winter, with snow on the roofs, the trees and the road in front"]


def test_v12_prompt_lengths_compile_each_block_type_once(tracing_backend):
    with Step1XEditRuntime.load("tiny-v1.2", device="cpu", compile=True, cuda_graphs=False) as rt:
        lengths = set()
        dit = rt.stages.load("dit").module
        def text_length(module, args, kwargs):  # the DiT's llm_embedding: positional or keyword
            lengths.add(kwargs.get("llm_embedding", args[3:4] and args[3]).shape[1])

        seen = dit.register_forward_pre_hook(text_length, with_kwargs=True)
        for prompt in PROMPTS:
            rt.edit(photo(), prompt, steps=1, seed=0, size_level=32)
        seen.remove()
        assert len(lengths) >= len(PROMPTS)  # both branches' lengths: at least ten different
        assert rt.stats().compiles == len(BLOCK_LISTS)


def test_runtimes_in_one_process_share_one_backend(tracing_backend):
    with Step1XEditRuntime.load("tiny", device="cpu", compile=True) as first:
        first.edit(photo(), "add a hat", steps=1, size_level=32)
        assert first.stats().compiles == len(BLOCK_LISTS)
    with Step1XEditRuntime.load("tiny", device="cpu", compile=True, seed=1) as second:
        second.edit(photo(), "add a hat", steps=1, size_level=32)
        assert second.compiler is first.compiler
        assert second.stats().compiles == 0  # dynamo's entries for this backend serve the new DiT's blocks


def test_sequential_load_with_a_step_cache_lets_the_dit_go():
    """After an edit with sequential loading, nothing of the runtime holds the DiT (the step cache included):
    the next edit's DiT is not loaded on top of it."""
    held = []

    def grab(step: int, total: int) -> None:
        if not held:
            held.append(weakref.ref(rt.stages.resident["dit"].module))

    pipe = Step1XEditPipeline.random("tiny", seed=0)
    cpu = torch.device("cpu")
    # A DiT built per load, as a model folder's loader does (the tiny loaders share one module).
    loaders = {**pipeline_loaders(pipe, cpu, torch.float32),
               "dit": lambda: TorchEngine(copy.deepcopy(pipe.model), dit_spec(pipe.config), torch.float32, cpu)}
    options = RuntimeOptions(precision="fp32", sequential_load=True, cache="teacache:0.2")
    with Step1XEditRuntime(pipe.config, loaders, options, cpu) as rt:
        rt.edit(photo(), "add a hat", steps=2, size_level=32, progress=grab)
        gc.collect()
        assert held and held[0]() is None
        assert rt.cache_stats is not None and rt.cache_stats.computed >= 1  # the cache ran


def derived_ptrs(q: QuantLinear) -> tuple[int, int]:
    return q._act_mul.data_ptr(), q._out_scale.data_ptr()


def test_quant_linear_derived_tensors_keep_their_memory_when_recomputed():
    """A CUDA graph reads tensors by address: `.to()` onto the same device and a re-choice of the kernel
    update `_act_mul` / `_out_scale` in place (new values, same storage)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = QuantLinear.from_linear(linear, QuantFormat.INT8, input_scale=torch.tensor(0.02),
                                weight_scale=torch.full((32,), 0.01), smooth=torch.rand(64) + 0.5)
    q.use_kernel(Kernel.INT_MM)  # what a GPU picks; the derived tensors exist for the GPU kernels only
    before = derived_ptrs(q)
    q.to("cpu")
    q.input_scale.fill_(0.04)
    q.choose_kernel()
    assert derived_ptrs(q) == before
    assert torch.equal(q._act_mul, (1 / q.input_scale) * q.smooth_inv)
    assert torch.equal(q._out_scale, (q.input_scale * q.weight_scale).reshape(-1))


def test_activation_scale_is_not_rounded():
    """The folded activation scale stays float32: rounded to bf16 (1/s = 100.3 -> 100.5) every quantized
    activation would carry a 0.2% gain. Measured as the least-squares gain of dequant(quant(x)) over x:
    the 8-bit rounding (step s, uniform error) leaves it within s / sqrt(12 n E[x^2]) ~ 1.3e-5 of 1 (1 sigma)."""
    s = 1 / 100.3
    q = QuantLinear(256, 8, QuantFormat.INT8, bias=False, per_channel=False)
    q.input_scale.fill_(s)
    q.use_kernel(Kernel.INT_MM)
    assert q._act_mul.dtype == torch.float32
    x = (torch.rand(400, 256, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2).bfloat16()
    deq = quantize_activation(x, q._act_mul, q.fmt).float() * s
    xf = x.float()
    gain = float((deq * xf).sum() / (xf * xf).sum())
    assert abs(gain - 1) < 2e-4  # 15 sigma; the bf16-rounded scale gives 100.5 / 100.3 - 1 = 2.0e-3


def test_ring_attention_fp32_kernel_returns_the_local_logsumexp():
    """fp32 ring attention on CUDA uses the memory-efficient kernel, whose log-sum-exp comes padded to a
    multiple of 32 rows (its meta function says so too); the ring's merge needs one row per local token."""
    q = torch.empty(1, 24, 4415, 128, device="meta")  # an odd local chunk of tokens
    padded = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, True)[1]
    assert padded.shape[-1] == 4416  # the padding the merge cannot broadcast
    op, kwargs = _kernel(q)
    out, lse, *_ = op(q, q, q, **kwargs)
    assert out.shape == q.shape and lse.shape == (1, 24, 4415)


def test_tensorrt_keeps_one_graph_per_engine():
    """One execution context per engine: graphs at other shapes would replay a context rebound since."""
    cuda = torch.device("cuda")
    trt = RuntimeOptions(backend="tensorrt", graph_cache=4).resolved(cuda)
    assert trt.cuda_graphs and trt.graph_cache == 1
    assert RuntimeOptions(backend="torch", graph_cache=4).resolved(cuda).graph_cache == 4


def test_build_sets_refit_when_asked_and_precision_flags_only_weakly_typed():
    trt = SimpleNamespace(BuilderFlag=SimpleNamespace(REFIT="REFIT", BF16="BF16", FP16="FP16"))
    assert builder_flags(trt, BuildOptions(refittable=True), Precision.BF16) == ["REFIT"]
    assert builder_flags(trt, BuildOptions(), Precision.BF16) == []
    assert builder_flags(trt, BuildOptions(strongly_typed=False, refittable=True), Precision.BF16) == ["REFIT", "BF16"]
    assert "--refittable" in CliRunner().invoke(main, ["build", "--help"]).output


def test_attention_option_is_in_force_around_the_step(monkeypatch):
    """The chosen kernel holds inside the step (here on CPU: only math and flash exist, so cuDNN refuses);
    auto on an H200 puts cuDNN first; a wrong name is refused with the choices."""
    q = torch.randn(1, 2, 8, 16)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    cpu = torch.device("cpu")
    math, default = with_attention(step, "math", cpu)(q), step(q)
    assert float((math - default).norm() / default.norm()) < 1e-5  # fp32, another summation order
    with pytest.raises(RuntimeError):
        with_attention(step, "cudnn", cpu)(q)
    assert with_attention(step, "auto", cpu) is step  # torch's own order off Hopper
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    order = []
    with_attention(lambda: order.append(torch._C._get_sdp_priority_order()), "auto", torch.device("cuda"))()
    assert order[0][0] == int(SDPBackend.CUDNN_ATTENTION)
    with pytest.raises(ValueError, match="auto, flash, cudnn, efficient, math"):
        RuntimeOptions(attention="fastest")
    assert "--attention [auto|flash|cudnn|efficient|math]" in CliRunner().invoke(main, ["edit", "--help"]).output
