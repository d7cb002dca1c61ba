"""DiT block streaming: a streamed edit is the resident edit bit for bit on the host (the same kernels over the
same weights, only copied), and the streamer orders its work so that no block's weights are read before their
copy's marker is waited on and no copy writes memory before the compute stream has handed it out. The order
is checked on a recording stand-in for CUDA streams and events, and the check is shown to fail with one wait
removed (each broken variant must be caught)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.runtime.offload.blocks import streamed_blocks, streamed_dit
from step1x_export.sources import small_pipeline
from step1x_export.step1x_ref.dit.step import torch_dit_step

aten = torch.ops.aten
ALLOCS = {aten.empty_like.default, aten.empty_strided.default, aten.empty.memory_format}
IMAGE = Image.new("RGB", (64, 48), (40, 160, 90))


@functools.cache
def _latent(source: str, **options: Any) -> torch.Tensor:
    """The final latent of one edit (each resident reference computed once per module)."""
    rt = Step1XEditRuntime.load(source, device="cpu", **options)
    rt.edit(IMAGE, "make the sky orange", seed=3, steps=3, size_level=64)
    assert rt.last_latent is not None
    return rt.last_latent


@pytest.mark.parametrize("source", ["tiny", "toy"])
@pytest.mark.parametrize(("resident", "ahead"), [(0, 1), (1, 2)])
def test_streamed_edit_equals_resident_edit(source: str, resident: int, ahead: int):
    resident_latent = _latent(source)
    assert torch.equal(_latent(source, resident_blocks=resident, prefetch_blocks=ahead), resident_latent)


def test_streamed_dit_serves_step_caching_pieces():
    """Step caching runs the DiT's pieces (first block, then the rest from block 1): the streamer's window follows."""
    resident_latent = _latent("tiny", cache="teacache:0.4")
    assert torch.equal(_latent("tiny", cache="teacache:0.4", resident_blocks=0, prefetch_blocks=2), resident_latent)


def test_streaming_options_are_checked():
    with pytest.raises(ValueError, match="resident_blocks must be None"):
        RuntimeOptions(resident_blocks=-1)
    with pytest.raises(ValueError, match="prefetch_blocks must be None .* or an integer >= 1"):
        RuntimeOptions(resident_blocks=0, prefetch_blocks=0)
    with pytest.raises(ValueError, match="needs backend torch"):
        RuntimeOptions(resident_blocks=0, compile=True)
    resolved = RuntimeOptions(resident_blocks=2).resolved(torch.device("cuda"))
    assert not resolved.cuda_graphs and not resolved.compile  # per-call copies: eager, uncaptured


# -- the order of copies, waits, reads ------------------------------------------------------------------------
@dataclass
class Log:
    """Work as queued, per queue, in the host's program order: (queue, kind, detail)."""

    entries: list[tuple[str, str, Any]] = field(default_factory=list)
    current: str = "compute"

    def add(self, queue: str, kind: str, detail: Any) -> Any:
        index = sum(1 for q, k, _ in self.entries if q == queue and k != "alloc")  # allocating queues no work
        self.entries.append((queue, kind, detail))
        return (queue, index + 1)  # a marker: complete once the queue's first index + 1 entries have run


class RecordedQueue:
    def __init__(self, name: str, log: Log, skip_wait: int | None):
        self.name, self.log, self.skip_wait, self.waits = name, log, skip_wait, 0

    def record_event(self) -> Any:
        return self.log.add(self.name, "record", None)

    def wait_event(self, event: Any) -> None:
        self.waits += 1
        if self.waits != self.skip_wait:  # the broken variants drop one wait
            self.log.add(self.name, "wait", event)


class RecordedStreams:
    def __init__(self, log: Log, skip: tuple[str, int] | None = None):
        self.log = log
        self.compute = RecordedQueue("compute", log, skip[1] if skip and skip[0] == "compute" else None)
        self.side = RecordedQueue("side", log, skip[1] if skip and skip[0] == "side" else None)

    @contextmanager
    def on(self, queue: RecordedQueue) -> Iterator[None]:
        before, self.log.current = self.log.current, queue.name
        try:
            yield
        finally:
            self.log.current = before

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.log.add(self.log.current, "copy", dst.untyped_storage().data_ptr())
        dst.copy_(src)


class Reads(TorchDispatchMode):
    """Allocations and reads of streamed memory by the compute queue, into the log."""

    def __init__(self, log: Log):
        super().__init__()
        self.log = log
        self.streamed: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.log.current == "compute":
            if func in ALLOCS:
                self.streamed.add(out.untyped_storage().data_ptr())
                self.log.add("compute", "alloc", out.untyped_storage().data_ptr())
            else:
                for a in args:
                    if isinstance(a, torch.Tensor) and a.device.type != "meta" \
                            and a.untyped_storage().data_ptr() in self.streamed:
                        self.log.add("compute", "read", a.untyped_storage().data_ptr())
        return out


def ordering_violations(log: Log) -> list[str]:
    """Reads not after their copy's marker, copies not after their memory's allocation (on the other queue)."""
    index: dict[str, int] = {"compute": 0, "side": 0}
    waits: dict[str, list[tuple[int, Any]]] = {"compute": [], "side": []}
    last: dict[tuple[str, int], tuple[str, int]] = {}  # (kind, ptr) -> (queue, index) of the latest
    found = []

    def ordered(a: tuple[str, int], b: tuple[str, int]) -> bool:  # does a run before b?
        if a[0] == b[0]:
            return a[1] < b[1]
        return any(at < b[1] and ev[0] == a[0] and ev[1] > a[1] for at, ev in waits[b[0]])

    for queue, kind, detail in log.entries:
        here = (queue, index[queue])
        if kind == "wait":
            waits[queue].append((here[1], detail))
        elif kind == "alloc":  # memory freed by the compute work queued so far: the copy must follow that work
            last[("alloc", detail)] = (queue, here[1] - 1)
            continue
        elif kind == "copy":
            if not ordered(last[("alloc", detail)], here):
                found.append(f"copy into {detail:#x} may run before its memory was handed out")
            last[("copy", detail)] = here
        elif kind == "read" and ("copy", detail) in last and not ordered(last[("copy", detail)], here):
            found.append(f"read of {detail:#x} may run before its copy")
        index[queue] += 1
    return found


def _streamed_steps(skip: tuple[str, int] | None) -> tuple[Log, Any]:
    pipe = small_pipeline("tiny", seed=0, dtype=torch.float32)
    log = Log()
    model = streamed_dit(pipe.model, "cpu", resident=1, ahead=2, streams=RecordedStreams(log, skip))
    step = torch_dit_step(model, torch.float32)
    g = torch.Generator().manual_seed(0)
    c = pipe.config
    n_img, n_txt = 8, c.embedder.max_length
    pe = torch.randn(1, 1, n_txt + n_img, sum(c.dit.axes_dim) // 2, 2, 2, generator=g)
    img = torch.randn(2, n_img, c.dit.in_channels, generator=g)
    emb = torch.randn(2, n_txt, c.connector.in_channels, generator=g)
    mask = torch.ones(2, n_txt, dtype=torch.long)
    with Reads(log):
        for t in (1.0, 0.5):  # two DiT calls: the second starts on blocks prefetched by the first
            step(img, torch.full((2,), t), pe, emb, mask)
    return log, streamed_blocks(model)


@pytest.mark.parametrize("skip", [None, ("compute", 1), ("compute", 3), ("side", 1), ("side", 4)],
                         ids=["as_written", "no_compute_wait_1", "no_compute_wait_3", "no_side_wait_1",
                              "no_side_wait_4"])
def test_stream_order_and_the_check_catches_a_removed_wait(skip: tuple[str, int] | None):
    log, streamer = _streamed_steps(skip)
    kinds = [k for _, k, _ in log.entries]
    assert kinds.count("read") > 0 and kinds.count("copy") > 0  # the check saw the streamed weights move and be read
    violations = ordering_violations(log)
    if skip is None:
        assert violations == []
        streamed = 3  # tiny: 2 double + 2 single blocks, 1 resident
        # each streamed block copied once per call, plus the wrapped prefetch of the next call's first two
        assert streamer.copies == 2 * streamed + 2 and len(streamer.pending) == 2
    else:
        assert violations, f"removing wait {skip} went unnoticed"
