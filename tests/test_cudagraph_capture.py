"""The CUDA-graph wrapper's capture path, driven through its public call on a machine without a GPU.

A CPU cannot capture a graph, so `torch.cuda`'s stream and graph calls are replaced by fakes that keep a
graph's memory semantics: what runs during capture is recorded against the very tensors it read and wrote,
and `replay()` re-runs it into those same output tensors, reading whatever the static inputs hold now.
That is what the wrapper relies on (copy-in to static inputs, replay, copy-out), so a wrapper that forgot
to copy new inputs in, handed out its static outputs, captured twice for one shape or replayed the wrong
shape's graph fails here. What a fake cannot show (kernels really recorded, the memory pool, stream
ordering on a device) is for the GPU run: `test_real_capture_matches_eager` below, skipped without CUDA.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from step1x_export.runtime.engines.torch_engine import TorchEngine
from step1x_export.runtime.step.cudagraph import CudaGraphed
from step1x_export.runtime.step.engine_step import engine_step_fn
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.pipeline import sampling_inputs
from step1x_export.step1x_ref.sampling import denoise, guided_euler, pack


class FakeGraph:
    def __init__(self):
        self.kernels: list = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for kernel in self.kernels:
            kernel()

    @property
    def captured(self) -> bool:
        return bool(self.kernels)


class FakeCuda:
    """Stands in for torch.cuda's Stream / stream / current_stream / CUDAGraph / graph."""

    def __init__(self):
        self.capturing: FakeGraph | None = None
        self.graphs: list[FakeGraph] = []
        self.pools: list[object] = []
        self.on_side_stream = 0  # calls made inside `with torch.cuda.stream(side)` (the warm-up)
        self.eager_calls = 0  # calls outside warm-up, capture and replay: must stay 0 with graphs on
        self._side = False
        self.replaying = False

    def install(self, monkeypatch) -> None:
        fake = self

        class Stream:
            def wait_stream(self, other) -> None:
                pass

        @contextmanager
        def stream(_s):
            fake._side = True
            try:
                yield
            finally:
                fake._side = False

        @contextmanager
        def graph(g, pool=None, **_kw):
            fake.capturing = g
            fake.graphs.append(g)
            fake.pools.append(pool)
            try:
                yield
            finally:
                fake.capturing = None

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)

    def recorded(self, fn):
        """`fn` as a graph sees it: called during capture, it records itself against its argument tensors."""
        fake = self

        def run(*args):
            if fake._side:
                fake.on_side_stream += 1
            elif fake.capturing is None and not fake.replaying:
                fake.eager_calls += 1
            out = fn(*args)
            if fake.capturing is not None:
                outs = out if isinstance(out, tuple) else (out,)

                def kernel(args=args, outs=outs):
                    fake.replaying = True
                    try:
                        new = fn(*args)
                    finally:
                        fake.replaying = False
                    for o, n in zip(outs, new if isinstance(new, tuple) else (new,), strict=True):
                        o.copy_(n)

                fake.capturing.kernels.append(kernel)
            return out

        return run


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


def test_capture_once_per_shape_then_replay_with_new_inputs(fake_cuda):
    wrapped = CudaGraphed(fake_cuda.recorded(lambda x, y: (x * 2 + y, x - y)), enabled=True, warmup=2)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    first = wrapped(a, b)
    assert fake_cuda.on_side_stream == 2  # warm-up on the side stream
    assert len(fake_cuda.graphs) == 1 and fake_cuda.graphs[0].captured
    assert fake_cuda.pools == [None]  # a private pool per graph, so evicting it frees its memory
    assert torch.equal(first[0], a * 2 + b) and torch.equal(first[1], a - b)

    c, d = torch.randn(4, 3), torch.randn(4, 3)
    replays = fake_cuda.graphs[0].replays
    second = wrapped(c, d)  # same shapes: replay, no new capture
    assert len(fake_cuda.graphs) == 1 and fake_cuda.graphs[0].replays == replays + 1
    assert torch.equal(second[0], c * 2 + d)  # new values were copied into the static inputs
    assert torch.equal(first[0], a * 2 + b)  # the first result is a copy, not the static output

    e, f = torch.randn(2, 5), torch.randn(2, 5)
    third = wrapped(e, f)  # a new shape: a second graph
    assert len(fake_cuda.graphs) == 2 and torch.equal(third[1], e - f)
    again = wrapped(a, b)  # back to the first shape: its own graph replays
    assert len(fake_cuda.graphs) == 2 and torch.equal(again[0], a * 2 + b)
    assert fake_cuda.eager_calls == 0  # with graphs on, fn never runs outside warm-up / capture / replay


def test_evicted_shape_is_captured_again(fake_cuda):
    wrapped = CudaGraphed(fake_cuda.recorded(lambda x: x + 1), enabled=True, capacity=1, warmup=1)
    a, b = torch.randn(3), torch.randn(2, 2)
    assert torch.equal(wrapped(a), a + 1) and torch.equal(wrapped(b), b + 1)  # b's graph evicts a's
    assert wrapped.graphs == 1 and wrapped.counts.captured == 2 and wrapped.counts.evicted == 1
    assert torch.equal(wrapped(a), a + 1)  # a again: captured anew, b's graph evicted
    assert len(fake_cuda.graphs) == 3 and wrapped.counts.evicted == 2 and fake_cuda.eager_calls == 0


def test_single_tensor_output_stays_a_tensor(fake_cuda):
    wrapped = CudaGraphed(fake_cuda.recorded(lambda x: x.exp()), enabled=True)
    x = torch.randn(3)
    out = wrapped(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, x.exp())
    out2 = wrapped(x + 1)
    assert isinstance(out2, torch.Tensor) and torch.equal(out2, (x + 1).exp())


def _denoise_inputs(pipe, steps: int):
    config = pipe.config
    gen = torch.Generator().manual_seed(0)
    txt = config.embedder.max_length
    emb = torch.randn(2, txt, config.embedder.hidden_size, generator=gen)
    mask = (torch.arange(txt) < 12).long().expand(2, -1).contiguous()
    noise, pe, timesteps = sampling_inputs(config, txt, 32, 32, seed=1, steps=steps)
    ref = pack(torch.randn(1, 16, 4, 4, generator=gen))
    return noise, ref, timesteps, (pe, emb, mask)


def test_whole_denoising_step_captured_once_serves_every_step(fake_cuda, tiny_pipe):
    """The runtime's graphed update (DiT + CFG + Euler) over the tiny DiT: one capture for all steps (the CFG
    rescale switch flips at t = truncate), and the latent equals the eager loop's bit for bit."""
    engine = TorchEngine(tiny_pipe.model, dit_spec(tiny_pipe.config), torch.float32, torch.device("cpu"))
    update = guided_euler(engine_step_fn(engine))
    noise, ref, timesteps, conditioning = _denoise_inputs(tiny_pipe, steps=2)
    truncate = tiny_pipe.config.cfg_truncate
    assert any(t > truncate for t in timesteps[:-1]) and any(t <= truncate for t in timesteps[:-1])
    eager = denoise(update, noise, ref, timesteps, guidance=6.0, truncate=truncate, conditioning=conditioning)
    graphed = CudaGraphed(fake_cuda.recorded(update), enabled=True, warmup=1)
    got = denoise(graphed, noise, ref, timesteps, guidance=6.0, truncate=truncate, conditioning=conditioning)
    assert len(fake_cuda.graphs) == 1 and fake_cuda.graphs[0].replays >= len(timesteps) - 2
    assert fake_cuda.eager_calls == 0
    assert torch.equal(got, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to capture a real graph")
def test_real_capture_matches_eager():
    x, y = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    wrapped = CudaGraphed(lambda a, b: a @ b + 1, enabled=True)
    assert torch.equal(wrapped(x, y), x @ y + 1)
    assert torch.equal(wrapped(y, x), y @ x + 1)  # replayed with new inputs
