"""The compiled runtime on CPU: one compile per block type serves every edit size, the shipped default
configuration (quant artifact + compile + CUDA graphs requested) runs end to end, and the compiled path
agrees with eager by relative error on the final latent (fp32), within a bound that holds on any x86-64
vector ISA (inductor's generated code and ATen's kernels are picked per CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.calibrate.artifact import save_artifact
from step1x_export.calibrate.collect import collect_stats
from step1x_export.calibrate.dataset import describe, split_pairs
from step1x_export.calibrate.recipes import build_artifact
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.runtime.engines.compile import BLOCK_LISTS, is_compiled
from step1x_export.runtime.step.cudagraph import CudaGraphed, GraphCounts
from step1x_export.runtime.telemetry.progress import StepEvents
from step1x_export.specs import BUCKET_ASPECTS, shape_bucket
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

pytestmark = pytest.mark.xdist_group("compile")  # one worker: inductor's C++ builds use both cores
STEPS = 2
# 12 edits of 12 different token counts (w x h at size_level ~ sqrt(w h)): 4..28 image tokens per side
SIZES = [(32, 32), (48, 32), (64, 32), (48, 48), (64, 48), (80, 48), (64, 64), (96, 48), (80, 64), (96, 64),
         (112, 64), (128, 64)]
MAX_REL_ERR = 1e-5  # inductor reorders fp32 reductions and fuses; measured below, printed
# W8A8: compiled and eager code round differently in float32 (~1e-7 relative per op, more after a few layers);
# an activation within that distance of a rounding tie gets the neighbouring 8-bit code, one quantization step
# away. Ties are rare: a step is 1/127 of the range (int8) or 1/8 of the value (fp8), so reordering moves
# ~1e-4 of the codes, and a flipped code errs by one step where a rounded one errs by <= half a step (rms
# step/sqrt(12)). The error from flips relative to the quantization error is about sqrt(12 * share): bounded
# at 0.1 (share <= 1e-3). Any real fault (a scale, a smoothing factor, a layer left unquantized) errs as much
# as the quantization itself or more; the fp32 bound above would instead depend on the ISA of the CPU.
MAX_FLIP_ERR_SHARE = 0.1


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def edit(rt: Step1XEditRuntime, w: int, h: int) -> torch.Tensor:
    """Edit a w x h picture; the final latent (the denoiser's output, before decode)."""
    assert rt.edit(image(w, h), "add a red hat", seed=0, steps=STEPS, size_level=round((w * h) ** 0.5)).size == (w, h)
    assert rt.last_latent is not None
    return rt.last_latent.clone()


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops; the generated C++ kernels and the tests share 2 loaded cores
    yield
    torch.set_num_threads(previous)


@pytest.mark.isa
@pytest.mark.usefixtures("fresh_compiles")
def test_twelve_sizes_one_compiled_runtime():
    with Step1XEditRuntime.load("tiny", backend="torch", device="cpu", compile=True) as rt, \
            Step1XEditRuntime.load("tiny", backend="torch", device="cpu", compile=False) as eager:
        module = rt.stages.resident["dit"].module
        assert rt.options.compile and is_compiled(module)
        assert not eager.options.compile
        latents = [edit(rt, w, h) for w, h in SIZES]
        stats = rt.stats()
        print(f"12 sizes through one compiled runtime: {stats.summary()}")
        assert stats.edits == len(SIZES)
        tokens = {lat.shape[1] for lat in latents}
        assert len(tokens) == len(SIZES)  # really 12 token counts
        # The bound: one compile per block type, whatever the number of sizes (dynamic token dim).
        assert stats.compiles == len(BLOCK_LISTS)
        for i in (0, len(SIZES) - 1):  # the first and last size against eager runtime of the same weights
            err = rel_err(latents[i], edit(eager, *SIZES[i]))
            print(f"compiled vs eager final latent at {SIZES[i]}: rel err {err:.2e}")
            assert err <= MAX_REL_ERR
    assert not is_compiled(module)  # closing hands the DiT back eager


@pytest.mark.isa
@pytest.mark.usefixtures("fresh_compiles")
def test_shipped_default_configuration_with_quant_and_compile(tmp_path: Path):
    """What `step1x-export edit --quant A` runs on a GPU (compile auto = on there, CUDA graphs on), with
    compile forced so the CPU runs it: quantized blocks compile (fullgraph) and match eager W8A8."""
    pipe = Step1XEditPipeline.random("tiny", seed=0)
    pairs = split_pairs()[0][:1]
    stats = collect_stats(pipe, pairs, steps=STEPS, size_level=32, progress=False)
    path = save_artifact(build_artifact(pipe.model, stats, "fp8", calibration=describe(pairs)), tmp_path / "fp8.st")
    defaults = RuntimeOptions()
    with Step1XEditRuntime.load("tiny", device="cpu", compile=False) as full:
        fp32 = edit(full, 64, 48)
    with Step1XEditRuntime.load("tiny", device="cpu", quant=path, compile=True) as rt, \
            Step1XEditRuntime.load("tiny", device="cpu", quant=path, compile=False) as eager:
        assert (rt.options.cuda_graphs, rt.options.graph_cache) == (False, defaults.graph_cache)  # resolved on CPU
        assert rt.options.compile
        want = edit(eager, 64, 48)
        err, quant_err = rel_err(edit(rt, 64, 48), want), rel_err(want, fp32)
        print(f"shipped default (fp8 artifact, compiled) vs eager W8A8: final latent rel err {err:.2e}, "
              f"{err / quant_err:.3f} of the quantization error ({quant_err:.2e}); {rt.stats().summary()}")
        assert quant_err > 0 and err <= MAX_FLIP_ERR_SHARE * quant_err
        assert rt.stats().compiles == len(BLOCK_LISTS)


def test_graph_cache_is_bounded_lru():
    counts = GraphCounts()
    graphed = CudaGraphed(lambda a: a * 2, enabled=False, capacity=2, counts=counts)
    for n in (1, 2, 1, 3, 2):  # 3 evicts 2 (1 was used more recently); 2 then evicts 1
        assert graphed(torch.ones(n)).tolist() == [2.0] * n
    assert [k[0][0] for k in graphed.entries] == [(3,), (2,)]  # least recently used first
    assert counts.evicted == 2 and counts.captured == 0  # nothing is captured without CUDA
    with pytest.raises(ValueError, match="capacity"):
        CudaGraphed(lambda a: a, enabled=False, capacity=0)


def test_step_events_report_finished_steps_in_order():
    seen: list[tuple[int, int]] = []
    steps = StepEvents(torch.device("cpu"), lambda done, total: seen.append((done, total)))
    for i in range(3):
        steps(i + 1, 3)
    steps.finish()
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len(steps.step_seconds()) == 3 and all(s >= 0 for s in steps.step_seconds())


def test_compile_option_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not RuntimeOptions().resolved(cpu).compile  # auto: where it helps, the torch DiT on CUDA
    assert RuntimeOptions().resolved(cuda).compile
    assert RuntimeOptions(compile=True).resolved(cpu).compile  # forced: CPU too (how tests run it)
    assert not RuntimeOptions(compile=False).resolved(cuda).compile
    assert not RuntimeOptions(backend="onnxruntime", compile=True).resolved(cpu).compile  # no torch DiT there
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="graph_cache"):
            RuntimeOptions(graph_cache=bad)  # type: ignore[arg-type]


def test_shape_buckets_bound_the_shapes_and_keep_the_output_size():
    with Step1XEditRuntime.load("tiny", device="cpu", compile=False, shape_buckets=True) as rt:
        tokens = set()
        for w, h in [(40, 40), (44, 40), (41, 39), (100, 45), (45, 100)]:
            out = rt.edit(image(w, h), "x", steps=1, size_level=32)
            assert out.size == (w, h)  # resized back to the input's size
            tokens.add(rt.last_latent.shape[1])
        assert len(tokens) == 2  # 5 inputs, 5 aspects: snapped to 1:1 and 2:1 / 1:2 (same token count)
    assert shape_bucket(41, 39, 64) == shape_bucket(40, 40, 64) == (64, 64)
    assert len({shape_bucket(w, 100, 64) for w in range(40, 260, 7)}) <= len(BUCKET_ASPECTS)
