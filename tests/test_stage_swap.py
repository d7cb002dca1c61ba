"""Stage swapping from host memory (`sequential_load="host"`) on the tiny models: each stage is built (read)
once per process, an edit through it equals the resident edit bit for bit, only the running stage's weights
are on the device (the next one's copy started as the current one ends), and v1.2's thinking and reflection
take the MLLM from the stages for each text, so it is never on the device beside the DiT.

Each loader here builds a fresh engine over deep copies of one tiny pipeline's modules, so a build is counted
(`Stages.loads`) and a copy kept alive by mistake is seen (weakrefs).
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli.runtime_options import RuntimeArgs, runtime_options
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.runtime.engines.compile import BLOCK_LISTS
from step1x_export.runtime.engines.torch_engine import TorchEncoder
from step1x_export.runtime.loaders import pipeline_loaders
from step1x_export.runtime.offload.swap import HostSwap, engine_modules, module_tensors
from step1x_export.runtime.stages import STAGE_ORDER, Loader
from step1x_export.sources import small_pipeline
from step1x_export.step1x_ref.mllm.generation import TextGenerator
from step1x_export.step1x_ref.mllm.reasoning import reasoned_edit
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

EDIT = {"steps": 2, "cfg": 6.0, "size_level": 32}
CPU = torch.device("cpu")


def fresh_loaders(pipe: Step1XEditPipeline, built: dict[str, list[weakref.ref]]) -> dict[str, Loader]:
    """Loaders that build a new engine over new copies of `pipe`'s modules at each call, each module recorded."""
    base = pipeline_loaders(pipe, CPU, torch.float32)

    def fresh(name: str) -> Loader:
        def load() -> Any:
            engine = copy.deepcopy(base[name]())
            built.setdefault(name, []).extend(weakref.ref(m) for m in engine_modules(engine))
            return engine

        return load

    return {name: fresh(name) for name in STAGE_ORDER}


def live(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


@pytest.fixture(scope="module")
def pipe() -> Step1XEditPipeline:
    return small_pipeline("tiny", seed=0)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))


def runtime(pipe: Step1XEditPipeline, sequential_load: bool | str, built: dict | None = None) -> Step1XEditRuntime:
    loaders = fresh_loaders(pipe, {} if built is None else built)
    return Step1XEditRuntime(pipe.config, loaders, RuntimeOptions(precision="fp32", sequential_load=sequential_load),
                             CPU)


def test_host_swap_edits_as_resident_and_reads_each_stage_once(pipe, image):
    prompts = [("make it red", 3), ("Make the sky purple", 4), ("make it red", 3)]
    with runtime(pipe, False) as resident:
        expected = [(np.asarray(resident.edit(image, p, seed=s, **EDIT)), resident.last_latent) for p, s in prompts]
    with runtime(pipe, "host") as swapped, runtime(pipe, True) as from_disk:
        for (pixels, latent), (prompt, seed) in zip(expected, prompts, strict=True):
            got = np.asarray(swapped.edit(image, prompt, seed=seed, **EDIT))
            assert np.array_equal(got, pixels) and torch.equal(swapped.last_latent, latent)
            from_disk.edit(image, prompt, seed=seed, **EDIT)
        assert swapped.stages.loads == dict.fromkeys(STAGE_ORDER, 1)  # read once, then swapped from the host
        assert from_disk.stages.loads == dict.fromkeys(STAGE_ORDER, len(prompts))  # rebuilt for every turn


def test_host_swap_holds_only_the_running_stage_and_copies_the_next_ahead(pipe, image):
    with runtime(pipe, "host") as rt:
        stages = rt.stages
        during_dit: list[tuple[set[str], bool, bool]] = []
        ahead: list[tuple[str, bool]] = []  # (stage, its copy already started) when its turn comes
        load = stages.load

        def recording_load(name: str) -> Any:
            if name not in stages.resident:
                ahead.append((name, name in stages.swap.on_device))
            return load(name)

        def on_host(name: str) -> bool:  # every weight of the parked stage is its host copy (no device copy)
            host = stages.swap.copies[name].host
            tensors = module_tensors(engine_modules(stages.parked[name]))
            return [t.data_ptr() for t in tensors] == [h.data_ptr() for h in host]

        def progress(done: int, total: int) -> None:
            dit = stages.swap.copies.get("dit")
            pairs = zip(dit.tensors, dit.host, strict=True) if dit is not None else ()
            dit_copied = all(t.data_ptr() != h.data_ptr() for t, h in pairs)  # the first edit's DiT: as built
            during_dit.append((set(stages.resident), dit_copied, on_host("encoder") and on_host("vae_encoder")))

        stages.load = recording_load  # the test's own probe on its own runtime object
        for _ in range(2):
            rt.edit(image, "make it red", seed=3, progress=progress, **EDIT)
            assert stages.resident == {} and stages.swap.on_device == set() and stages.swap.device_bytes() == 0
            assert all(on_host(name) for name in STAGE_ORDER)
        # the first edit builds each stage; in the second each copy started when the stage before it ended
        assert ahead == [(name, False) for name in STAGE_ORDER] + [("encoder", False)] + [
            (name, True) for name in STAGE_ORDER[1:]]
        assert during_dit[2:] == [({"dit"}, True, True)] * 2  # the second edit: the DiT alone on the device


def test_text_to_image_skips_the_vae_encoder_copied_ahead(pipe, image):
    """Text-to-image runs no VAE encoder: its copy, started as the MLLM ended, goes back before the DiT arrives."""
    t2i = {"seed": 2, "steps": 2, "width": 48, "height": 32}
    with runtime(pipe, False) as resident:
        expected = np.asarray(resident.edit(None, "a red square", **t2i))
    with runtime(pipe, "host") as rt:
        rt.edit(image, "make it red", seed=3, **EDIT)  # every stage built and parked
        seen: list[set[str]] = []
        got = rt.edit(None, "a red square", progress=lambda *_: seen.append(set(rt.stages.swap.on_device)), **t2i)
        assert np.array_equal(np.asarray(got), expected)
        assert seen == [{"dit"}] * 2 and rt.stages.swap.on_device == set()


@pytest.mark.usefixtures("fresh_compiles")
def test_a_compiled_dit_swapped_from_the_host_compiles_once(pipe, image):
    """Compile is on by default on a GPU: the blocks' weights change address at every turn (`.data` repointed),
    which must not recompile them, and the compiled edits equal the compiled resident runtime's."""
    compiled = {"precision": "fp32", "compile": True, "threads": 1}
    with Step1XEditRuntime.from_pipeline(pipe, RuntimeOptions(sequential_load="host", **compiled)) as rt:
        swapped = [np.asarray(rt.edit(image, "make it red", seed=s, **EDIT)) for s in (3, 4)]
        assert rt.stats().compiles == len(BLOCK_LISTS) and rt.stages.loads["dit"] == 1
    with Step1XEditRuntime.from_pipeline(pipe, RuntimeOptions(**compiled)) as resident:
        assert all(np.array_equal(np.asarray(resident.edit(image, "make it red", seed=s, **EDIT)), got)
                   for s, got in zip((3, 4), swapped, strict=True))


@pytest.fixture
def short_texts(monkeypatch):
    # random weights rarely end a text early: short texts and small judge images keep the generations fast
    for name, value in (("MAX_NEW_TOKENS", 4), ("JUDGE_MIN_PIXELS", 28 * 28), ("JUDGE_MAX_PIXELS", 56 * 56)):
        monkeypatch.setattr(f"step1x_export.step1x_ref.mllm.generation.{name}", value)


def test_reasoned_edit_lets_the_mllm_go_before_the_dit(image, short_texts):
    pipe = small_pipeline("tiny-v1.2", seed=0)
    built: dict[str, list[weakref.ref]] = {}
    mllms_during_dit: list[int] = []
    ask = {"think": True, "reflect": 1, "judge_retries": 1, "seed": 5, "steps": 1, "size_level": 32}

    def progress(done: int, total: int) -> None:
        mllms_during_dit.append(live(built["encoder"]))

    with runtime(pipe, True, built) as rt:
        result = rt.edit_reasoned(image, "make it blue", progress=progress, **ask)
        assert mllms_during_dit and set(mllms_during_dit) == {0}  # no MLLM alive while the DiT runs
        assert len(built["encoder"]) > 1  # the MLLM was rebuilt for its turns: the check below saw each copy
    with runtime(pipe, False) as resident:  # one generator over the one MLLM, as the reference runs it
        edits = iter(range(ask["seed"], ask["seed"] + 10))
        generate = TextGenerator.for_embedder(resident.stages.load("encoder").embedder, ask["seed"])
        expected = reasoned_edit(lambda img, p: resident.edit(img, p, seed=next(edits), steps=1, size_level=32),
                                 generate, image, "make it blue", think=True, reflect=1, retries=1)
    assert result.texts == expected.texts
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, expected.images,
                                                                              strict=True))


def test_reasoned_edit_swaps_the_mllm_from_the_host(image, short_texts):
    pipe = small_pipeline("tiny-v1.2", seed=0)
    with runtime(pipe, "host") as rt:
        rt.edit_reasoned(image, "make it blue", think=True, reflect=1, judge_retries=1, steps=1, size_level=32)
        assert rt.stages.loads == dict.fromkeys(STAGE_ORDER, 1)


def test_sequential_load_values_are_checked_and_the_flag_takes_them():
    with pytest.raises(ValueError, match="sequential_load must be False"):
        RuntimeOptions(sequential_load="pinned")  # type: ignore[arg-type]

    @click.command()
    @runtime_options(source=False, only=("sequential_load",))
    def show(runtime: RuntimeArgs) -> None:
        click.echo(repr(runtime.options().sequential_load))

    said = {tuple(args): CliRunner().invoke(show, args).output.strip()
            for args in ([], ["--sequential-load"], ["--sequential-load", "disk"], ["--sequential-load", "host"])}
    assert list(said.values()) == ["False", "True", "True", "'host'"]


class Queue:
    def __init__(self, name: str, log: list[tuple]):
        self.name, self.log = name, log

    def record_event(self) -> tuple:
        marker = ("marker", self.name, len(self.log))
        self.log.append((self.name, "record", marker))
        return marker

    def wait_event(self, event: Any) -> None:
        self.log.append((self.name, "wait", event))


class RecordedStreams:
    """The queues' calls in program order, each copy and hand-over with the storage it concerns."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.compute, self.side = Queue("compute", self.log), Queue("side", self.log)
        self.current = "compute"

    @contextmanager
    def on(self, queue: Queue) -> Iterator[None]:
        before, self.current = self.current, queue.name
        try:
            yield
        finally:
            self.current = before

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.append((self.current, "copy", dst.data_ptr()))
        dst.copy_(src)

    def hand_over(self, tensor: torch.Tensor, queue: Queue) -> None:
        self.log.append((queue.name, "hand_over", tensor.data_ptr()))


def test_a_swap_copies_on_the_side_queue_and_the_stage_waits_for_its_marker():
    """What the CUDA path relies on: every weight copied on the side queue, the marker recorded after the last
    copy, the compute queue waiting for that marker and taking each copy over (so its memory is not reused
    before the compute has read it)."""
    streams = RecordedStreams()
    swap = HostSwap(CPU, streams)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    module.register_buffer("scale", torch.ones(4))
    engine = TorchEncoder(module)  # an engine holding one module
    swap.park("encoder", engine)
    swap.start("encoder")
    swap.arrive("encoder")
    copies = [t.data_ptr() for t in module_tensors([module])]
    assert len(copies) == 5 and len(set(copies)) == 5
    ready = ("marker", "side", len(copies))
    assert streams.log == [("side", "copy", p) for p in copies] + [
        ("side", "record", ready), ("compute", "wait", ready)] + [("compute", "hand_over", p) for p in copies]
    swap.park("encoder", engine)
    assert [t.data_ptr() for t in module_tensors([module])] == [h.data_ptr() for h in swap.copies["encoder"].host]
