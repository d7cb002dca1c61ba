"""Runtime pieces without a GPU or TensorRT: the fused step (what a CUDA graph captures) equals the eager
loop, the graph cache keys by shape, the buffer pool allocates once per shape, profiles are selected,
and an engine built for another GPU or TensorRT version is refused."""

from __future__ import annotations

import json

import pytest
import torch

from step1x_export.precision import Precision
from step1x_export.runtime import (
    BufferPool,
    BuildPlatform,
    CudaGraphed,
    EngineMismatchError,
    ProfileError,
    RuntimeOptions,
    TorchEngine,
    check_compatible,
    engine_step_fn,
    plan_buffers,
    profile_shapes,
    select_profile,
)
from step1x_export.runtime.engines.buffers import edit_dims
from step1x_export.runtime.engines.trt_build import BuildOptions
from step1x_export.runtime.engines.trt_manifest import EngineManifest, EngineRecord
from step1x_export.specs import dim_ranges, dit_spec
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.math import rope_table
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.sampling import denoise, get_schedule, guided_euler, position_ids
from step1x_export.step1x_ref.weights.random_weights import randomize_

CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def dit() -> TorchEngine:
    model = randomize_(Step1XEdit(CONFIG), 0).eval()
    return TorchEngine(model, dit_spec(CONFIG), torch.float32, "cpu")


def step_inputs(n_h: int, n_w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, txt = n_h * n_w, CONFIG.embedder.max_length
    x, ref = torch.randn(1, n, 64, generator=gen), torch.randn(1, n, 64, generator=gen)
    emb = torch.randn(2, txt, CONFIG.embedder.hidden_size, generator=gen)
    mask = torch.zeros(2, txt, dtype=torch.long)
    mask[0, :7], mask[1, :3] = 1, 1
    pe = rope_table(position_ids(txt, n_h, n_w, CONFIG.version), CONFIG.dit.axes_dim, CONFIG.dit.theta)
    return x, ref, pe, emb, mask


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_fused_step_equals_eager_loop(dit, guidance):
    x, ref, pe, emb, mask = step_inputs(2, 3)
    timesteps = get_schedule(4, 6)  # t > 0.93 on the first steps: the rescale switch flips inside the schedule
    assert any(t > CONFIG.cfg_truncate for t in timesteps[:-1]) and any(t <= 0.93 for t in timesteps[:-1])
    def closed(img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the reference's way: conditioning closed over
        return dit(img=img, pe=pe, timestep=t, llm_embedding=emb, llm_mask=mask)["pred"].float()

    eager = denoise(guided_euler(closed), x, ref, timesteps, guidance=guidance, truncate=0.93)
    graphed = CudaGraphed(guided_euler(engine_step_fn(dit)), enabled=False)
    fused = denoise(graphed, x, ref, timesteps, guidance=guidance, truncate=0.93, conditioning=(pe, emb, mask))
    diff = (fused - eager).abs().max().item()
    print(f"graph-wrapped step vs eager loop (guidance {guidance}): max abs diff {diff:.2e}")
    assert diff <= 1e-6 * eager.abs().max().item()
    assert len(graphed.entries) == 1  # one shape: one entry, reused by every step


def test_graph_cache_keys_by_shape(dit):
    graphed = CudaGraphed(guided_euler(engine_step_fn(dit)), enabled=False)
    schedule = get_schedule(1, 6)

    def run(x, ref, pe, emb, mask):
        return denoise(graphed, x, ref, schedule, guidance=6.0, truncate=0.93, conditioning=(pe, emb, mask))

    for n_h, n_w in [(2, 3), (2, 3), (3, 2), (2, 2)]:  # (3, 2) has the shapes of (2, 3): same entry
        run(*step_inputs(n_h, n_w))
    assert len(graphed.entries) == 2
    (key6, entry6), (key4, _) = graphed.entries.items()
    assert key6[0][0] == (1, 6, 64) and key4[0][0] == (1, 4, 64)
    ptr = entry6.inputs[0].data_ptr()
    run(*step_inputs(2, 3, seed=1))
    assert entry6.inputs[0].data_ptr() == ptr  # static inputs: copied into, never reallocated


def test_graph_output_is_a_copy():
    calls = []

    def fn(a: torch.Tensor) -> torch.Tensor:
        calls.append(a.data_ptr())
        return a * 2

    graphed = CudaGraphed(fn, enabled=False)
    out1 = graphed(torch.ones(3))
    out2 = graphed(torch.full((3,), 5.0))
    assert out1.tolist() == [2.0] * 3 and out2.tolist() == [10.0] * 3
    assert calls[0] == calls[1]  # fn always sees the static input buffer


def test_buffer_pool_allocates_once_per_shape():
    spec, pool = dit_spec(CONFIG), BufferPool("cpu")
    small = plan_buffers(spec, edit_dims(CONFIG, 48, 32, 2), torch.float32)
    first = pool.bind(spec, small)
    assert pool.allocations == len(spec.inputs) + len(spec.outputs)
    again = pool.bind(spec, small)  # the next step / next edit of the same size
    assert pool.allocations == len(spec.inputs) + len(spec.outputs)
    assert all(first[k].data_ptr() == again[k].data_ptr() for k in first)
    pool.bind(spec, plan_buffers(spec, edit_dims(CONFIG, 64, 48, 2), torch.float32))
    fixed = [t.name for t in spec.inputs + spec.outputs if all(isinstance(d, int) for d in t.dims[1:])
             and t.dims[0] == "batch"]  # batch-only dynamic tensors keep their shape: reused across sizes
    assert pool.allocations == 2 * (len(spec.inputs) + len(spec.outputs)) - len(fixed)
    assert pool.nbytes > 0
    pool.clear()
    assert pool.nbytes == 0


def test_profile_selection_inside_and_outside():
    spec, ranges = dit_spec(CONFIG), dim_ranges(CONFIG)
    small = {k: (lo, lo, lo) for k, (lo, _, _) in ranges.items()}
    small["img_tokens"] = (ranges["img_tokens"][0], 8, 8)
    small["seq_len"] = (ranges["seq_len"][0], CONFIG.embedder.max_length + 8, CONFIG.embedder.max_length + 8)
    profiles = [profile_shapes(spec, small), profile_shapes(spec, ranges)]
    plan = plan_buffers(spec, edit_dims(CONFIG, 32, 16, 1), torch.float32)
    inputs = {t.name: plan[t.name].shape for t in spec.inputs}
    assert select_profile("dit", inputs, profiles) == 0
    plan = plan_buffers(spec, edit_dims(CONFIG, 64, 48, 2), torch.float32)
    assert select_profile("dit", {t.name: plan[t.name].shape for t in spec.inputs}, profiles) == 1
    plan = plan_buffers(spec, edit_dims(CONFIG, 512, 512, 2), torch.float32)
    with pytest.raises(ProfileError, match=r"dit: input shapes img \[2, 2048, 64\].*fit none of its 2 profile"):
        select_profile("dit", {t.name: plan[t.name].shape for t in spec.inputs}, profiles)
    lo, opt, hi = profiles[1]["img"]
    assert lo == (1, ranges["img_tokens"][0], 64) and opt == (2, ranges["img_tokens"][1], 64)
    assert hi == (2, ranges["img_tokens"][2], 64)


HERE = BuildPlatform("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")


@pytest.mark.parametrize(
    ("built", "message"),
    [
        (BuildPlatform("NVIDIA H100 80GB HBM3", "9.0", "10.7.0.23"), r"TensorRT version: built with '10\.7"),
        (BuildPlatform("NVIDIA A100-SXM4-80GB", "8.0", "10.8.0.43"), r"compute capability: built with '8\.0'"),
        (BuildPlatform("NVIDIA H200", "9.0", "10.8.0.43"), r"GPU: built with 'NVIDIA H200'"),
    ],
)
def test_engine_from_another_gpu_or_tensorrt_is_refused(built, message):
    check_compatible(HERE, HERE)  # the same platform loads
    with pytest.raises(EngineMismatchError, match=message):
        check_compatible(built, HERE, "dit.plan")


def test_engine_manifest_round_trip(tmp_path):
    profiles = [profile_shapes(dit_spec(CONFIG), dim_ranges(CONFIG))]
    record = EngineRecord("dit.plan", "ab" * 32, "cd" * 32, "bf16", True, 3, profiles)
    EngineManifest("tiny", HERE, {"dit": record}).write(tmp_path)
    back = EngineManifest.read(tmp_path)
    assert back.components["dit"].profiles == profiles and back.platform_ == HERE and back.config == "tiny"
    with pytest.raises(EngineMismatchError, match="rebuild"):
        back.check_platform(BuildPlatform(HERE.gpu_name, HERE.compute_capability, "11.0.0"))
    data = json.loads((tmp_path / "engines.json").read_text()) | {"format_version": 99}
    (tmp_path / "engines.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version 99"):
        EngineManifest.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="engines.json"):
        EngineManifest.read(tmp_path / "missing")


def test_options():
    with pytest.raises(NotImplementedError, match="attention_fp8"):
        RuntimeOptions(attention_fp8=True)
    with pytest.raises(ValueError, match="unknown backend"):
        RuntimeOptions(backend="tvm")  # type: ignore[arg-type]
    cpu = RuntimeOptions(precision="bf16").resolved(torch.device("cpu"))
    assert cpu.precision is Precision.BF16 and not cpu.cuda_graphs and not cpu.compile
    cuda = RuntimeOptions(backend="tensorrt").resolved(torch.device("cuda"))
    assert cuda.cuda_graphs and not cuda.compile  # compile is for the torch DiT only
    ort = RuntimeOptions(backend="onnxruntime").resolved(torch.device("cuda"))
    assert not ort.cuda_graphs and not ort.compile  # ORT's own stream + host sync cannot be captured
    with pytest.raises(ValueError, match="dit: fp8 graphs carry Q/DQ"):
        BuildOptions(strongly_typed=False).check("dit", Precision.FP8)
    BuildOptions(strongly_typed=False).check("dit", Precision.BF16)
    with pytest.raises(ValueError, match="opt_level"):
        BuildOptions(opt_level=7)
