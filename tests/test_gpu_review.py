"""CPU tests of the GPU path's design: compiles bounded over prompt lengths and shared across runtimes,
graph-safe derived buffers, step-cache memory released with sequential loading, the memory plan's
counted graph pools and context, ring attention's fp32 refusal, TensorRT engine flags and scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime import compile as compile_mod
from step1x_export.runtime.compile import BLOCK_LISTS, CompileBackend


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
        seen = dit.register_forward_pre_hook(lambda m, args, kw: lengths.add(kw.get("llm_embedding", args[3:4] and args[3]).shape[1]),
                                             with_kwargs=True)
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
