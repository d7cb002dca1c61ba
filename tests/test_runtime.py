"""The runtime end to end on the tiny model: equals the reference pipeline, loads stages one at a time,
serialises threads, releases on close, and checks shapes against an engine profile before any work.

The torch runtime and the reference run the same fp32 maths on the same modules: their final latents
must be bit-identical (`torch.equal`), not merely close.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.runtime import ProfileError, RuntimeOptions, Step1XEditRuntime, check_dims
from step1x_export.runtime import runtime as runtime_module
from step1x_export.runtime.engines.buffers import edit_dims, plan_buffers, profile_shapes, select_profile
from step1x_export.runtime.loaders import pipeline_loaders
from step1x_export.specs import dim_ranges
from step1x_export.step1x_ref import pipeline as pipeline_module
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

EDIT = {"seed": 3, "steps": 3, "cfg": 6.0, "size_level": 48}
PROMPT = 'Make the "sky" purple'


def edit_and_latent(module: ModuleType, edit: Callable[..., Image.Image], *args, **kwargs):
    """(image, final latent) of one edit: the module's loop (`denoise`, or the runtime's `denoise_lanes`: the
    one loop, over lanes) is wrapped to keep its result."""
    latents: list[torch.Tensor] = []
    name = "denoise" if hasattr(module, "denoise") else "denoise_lanes"
    loop = getattr(module, name)

    def recording(*a, **k):
        out = loop(*a, **k)
        final = out if name == "denoise" else a[1][0].x  # denoise_lanes(update, lanes): the lane keeps its x
        latents.append(final.detach().clone())
        return out

    with mock.patch.object(module, name, recording):
        image = edit(*args, **kwargs)
    assert len(latents) == 1
    return image, latents[0]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: the relative error of a whole tensor."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def reference_run(image) -> tuple[Image.Image, torch.Tensor]:
    """The reference pipeline's (image, final latent)."""
    return edit_and_latent(pipeline_module, Step1XEditPipeline.random("tiny", seed=0).edit, image, PROMPT, **EDIT)


@pytest.fixture(scope="module")
def reference(reference_run) -> Image.Image:
    return reference_run[0]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def runtime():
    with Step1XEditRuntime.load("tiny", seed=0, device="cpu") as rt:
        yield rt


def test_torch_backend_equals_reference(runtime, image, reference_run):
    out, latent = edit_and_latent(runtime_module, runtime.edit, image, PROMPT, **EDIT)
    reference, ref_latent = reference_run
    assert out.size == reference.size == image.size
    assert torch.equal(latent, ref_latent), f"rel err {rel_err(latent, ref_latent):.2e}"  # same fp32 maths
    assert same_pixels(out, reference)
    assert runtime.options.cuda_graphs is False and runtime.options.compile is False  # resolved for CPU
    assert {"preprocess", "mllm", "vae_encode", "denoise", "vae_decode", "postprocess"} <= runtime.timings.keys()
    assert runtime.peak_memory.bytes is None or runtime.peak_memory.bytes > 0


def test_threads_are_serialised(runtime, image, reference):
    results: list[Image.Image | BaseException] = [None, None]  # type: ignore[list-item]

    def work(i: int) -> None:
        try:
            results[i] = runtime.edit(image, PROMPT, **EDIT)
        except BaseException as e:  # surfaced by the assert below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert isinstance(r, Image.Image), r
        assert same_pixels(r, reference)  # no thread saw the other's buffers


def test_sequential_load_and_close(image, reference_run):
    steps = []
    rt = Step1XEditRuntime.load("tiny", seed=0, device="cpu", sequential_load=True)
    assert rt.stages.resident == {}  # nothing loaded before the first edit
    _, latent = edit_and_latent(runtime_module, rt.edit, image, PROMPT, **EDIT,
                                progress=lambda done, total: steps.append((done, total)))
    assert torch.equal(latent, reference_run[1])
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert rt.stages.resident == {}  # every stage freed after its turn
    assert all(n == 1 for n in rt.stages.loads.values())
    assert "load dit" in rt.timings

    rt2 = Step1XEditRuntime.load("tiny", seed=0, device="cpu")
    dit = weakref.ref(rt2.stages.resident["dit"].module)
    rt2.close()
    gc.collect()
    assert dit() is None, "close() must drop the last reference to the DiT"
    with pytest.raises(RuntimeError, match="closed"):
        rt2.edit(image, PROMPT, **EDIT)


def test_load_takes_the_options_object(image, reference_run):
    """`load(source, options)` runs as the options say; a keyword is one field on top of them; an unknown
    keyword names the valid ones. The edit is the reference's, bit for bit."""
    options = RuntimeOptions(precision="fp32", graph_cache=2, sequential_load=True)
    with Step1XEditRuntime.load("tiny", options, seed=0, device="cpu") as rt:
        assert (rt.options.graph_cache, rt.options.sequential_load, rt.options.precision) == (2, True, "fp32")
        _, latent = edit_and_latent(runtime_module, rt.edit, image, PROMPT, **EDIT)
        assert torch.equal(latent, reference_run[1])
    with Step1XEditRuntime.load("tiny", options, device="cpu", graph_cache=3, sequential_load=False) as rt:
        assert (rt.options.graph_cache, rt.options.sequential_load) == (3, False)
    with pytest.raises(TypeError, match="graph_cahe.*RuntimeOptions fields backend, precision, cuda_graphs"):
        Step1XEditRuntime.load("tiny", device="cpu", graph_cahe=3)
    with pytest.raises(ValueError, match="graph_cache must be an integer"):
        Step1XEditRuntime.load("tiny", device="cpu", graph_cache=0)


def test_profile_is_checked_before_any_work(image):
    pipe = Step1XEditPipeline.random("tiny", seed=0)
    config = pipe.config
    ranges = dim_ranges(config)
    profiles = {c: [profile_shapes(s, ranges)] for s, c in ((s, s.name) for s, _ in _specs(config))}

    def check(component, shapes):
        select_profile(component, shapes, profiles[component])

    loaders = pipeline_loaders(pipe, torch.device("cpu"), torch.float32)
    rt = Step1XEditRuntime(config, loaders, RuntimeOptions(precision="fp32"), "cpu", shape_check=check)
    rt.check_shapes(48, 32)  # inside the tiny profile
    assert rt.default_size_level == 256  # the tiny profile's top, not the real model's 1024
    with pytest.raises(ProfileError, match=r"vae_encoder: input shapes image \[1, 3, \d+, \d+\] fit none"):
        rt.edit(image, PROMPT, seed=0, steps=1, size_level=512)
    assert "mllm" not in rt.timings  # refused in preprocessing
    lo, _, hi = ranges["img_tokens"]  # lo: a text-to-image run's tokens (no reference half)
    with pytest.raises(ProfileError, match=rf"dit: .*img_tokens = 2048 \(expected {lo}\.\.{hi}\)"):
        check_dims(_specs(config)[1][0], edit_dims(config, 512, 512, 2), ranges)
    rt.close()


def test_buffer_plan_matches_spec():
    config = Step1XEditPipeline.random("tiny", seed=0).config
    spec = _specs(config)[1][0]
    plan = plan_buffers(spec, edit_dims(config, 64, 48, 2), torch.bfloat16)
    n = (64 // 16) * (48 // 16)
    assert plan["img"].shape == (2, 2 * n, 64) and plan["img"].dtype == torch.bfloat16
    assert plan["pe"].shape[2] == config.embedder.max_length + 2 * n and plan["pe"].dtype == torch.float32
    assert plan["llm_mask"].dtype == torch.int64 and plan["pred"].shape == (2, 2 * n, 64)


def _specs(config):
    from step1x_export.specs import dit_spec, vae_decoder_spec, vae_encoder_spec

    return [(vae_encoder_spec(config), 1), (dit_spec(config), 2), (vae_decoder_spec(config), 1)]
