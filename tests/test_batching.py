"""Batched edits with step-level joining: every edit of a batch is bit for bit the same edit run alone.

Why bit for bit, on any CPU and thread count: a batch changes only how many rows the DiT's ops see, and a
batched DiT call runs every op whose rounding depends on that count lane by lane (`runtime.lane_gemms`):
each GEMM (BLAS picks its kernel, so its summation order, by the row count; MKL here rounds a [2, C]
modulation vector and a small edit's image tokens differently at 2B rows, on its AVX2 path up to 48 rows per
edit) and each GELU / SiLU (their vectorised and scalar paths round differently, and ATen's per-thread chunks
end where the element count puts them), with the very arguments the edit alone passes. CFG and Euler run per
lane too (the rescale's pow is such an op). What the batch shares is exact per element (add, mul, the
timestep's sin / cos on whole vectors) or ordered by each row's own length (norms, attention's softmax
blocks by the sequence length, masked means over the text), which the batch does not change. Measured before
this: 4.8e-7 (tiny) and 4.4e-6 (toy) final-latent relative error; checked bit for bit here with 1, 2, 3 and 5
threads, and with ATen / MKL / oneDNN held to AVX2 and to SSE4. The VAE decodes each edit in a call of its
own (a batched call's convolutions may pick other kernels), so the images are bit for bit equal too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime.batching import EditJob, EditOutcome, graph_bucket
from step1x_export.serve.forecast import Forecast
from step1x_export.serve.queue import EditCancelled

# (seed, steps, cfg): mixed seeds, schedules (so the CFG truncation falls at different steps) and guidance,
# including cfg 0 (no guidance) and cfg 1.
EDITS = [(0, 2, 6.0), (1, 3, 2.0), (2, 4, 6.0), (3, 2, 0.0), (4, 3, 1.0)]


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=["tiny", "toy", "tiny-v1.2"])
def runtime(request):
    with Step1XEditRuntime.load(request.param, max_batch=4) as rt:
        yield rt


def job(i: int, **kw) -> EditJob:
    seed, steps, cfg = EDITS[i]
    return EditJob(image(seed), f"edit number {i}", seed=seed, steps=steps, cfg=cfg, size_level=64, **kw)


def alone(rt: Step1XEditRuntime, i: int) -> tuple[torch.Tensor, np.ndarray]:
    seed, steps, cfg = EDITS[i]
    out = rt.edit(image(seed), f"edit number {i}", seed=seed, steps=steps, cfg=cfg, size_level=64)
    return rt.last_latent.clone(), np.asarray(out)


@pytest.mark.isa  # which kernels a batch picks depends on the vector ISA: CI runs it again on the narrowest
def test_each_edit_of_a_batch_with_joiners_equals_the_edit_alone(runtime):
    """Two edits start together; the third joins at step 1, the fourth and fifth at step 2 (one waits for a
    place: max_batch 4); each leaves when its own schedule ends."""
    reference = {i: alone(runtime, i) for i in range(len(EDITS))}
    arrivals = {1: [job(2)], 2: [job(3), job(4)]}  # boundary -> edits arriving there
    boundary = 0
    offered: list[EditJob] = []

    def join(room: int, key: tuple[int, int]) -> list[EditJob]:
        nonlocal boundary
        offered.extend(arrivals.pop(boundary, []))
        boundary += 1
        taken, offered[:] = offered[:room], offered[room:]
        return taken

    outcomes = runtime.edit_batch([job(0), job(1)], join=join)
    assert sorted(o.job.seed for o in outcomes) == [0, 1, 2, 3, 4]
    assert max(max(o.batch_sizes) for o in outcomes) == 4  # the batch really filled up
    assert {len(o.batch_sizes) for o in outcomes} >= {2, 3, 4}  # each ran its own number of steps
    for o in outcomes:
        assert o.error is None, o.error
        latent, pixels = reference[o.job.seed]
        assert o.latent is not None and o.latent.shape == latent.shape
        assert torch.equal(o.latent, latent), (o.job.seed, rel_err(o.latent, latent))
        assert np.array_equal(np.asarray(o.image), pixels)
    # the first two ran batched from their first step, so the comparison above is not batch-1 against itself
    assert outcomes[0].batch_sizes[0] >= 2
    for o in outcomes:  # each DiT call it took part in, timed alone (the admission forecast's input)
        assert len(o.dit_seconds) == len(o.batch_sizes) and all(0 < t <= sum(o.step_seconds) for t in o.dit_seconds)
    assert all(o.timings["vae_decode"] > 0 for o in outcomes)  # each decoded in its own call (the forecast's input)
    dit = runtime.stages.load("dit").module  # the lane-by-lane forwards were only lent to the batched calls
    assert not [name for name, m in dit.named_modules() if "forward" in vars(m)]


def test_a_batch_of_one_is_bit_identical_to_edit(runtime):
    latent, pixels = alone(runtime, 1)
    (o,) = runtime.edit_batch([job(1)])
    assert torch.equal(o.latent, latent) and np.array_equal(np.asarray(o.image), pixels)


def test_a_cancelled_edit_leaves_its_batch_and_the_others_are_undisturbed(runtime):
    reference = {i: alone(runtime, i) for i in (0, 2)}

    def stop_after_one(done: int, total: int) -> None:
        if done == 1:
            raise EditCancelled("client gone")

    outcomes: list[EditOutcome] = []
    runtime.edit_batch([job(0), job(1, progress=stop_after_one), job(2)], done=outcomes.append)
    by_seed = {o.job.seed: o for o in outcomes}
    assert isinstance(by_seed[1].error, EditCancelled) and by_seed[1].image is None
    assert outcomes[0].job.seed == 1  # answered at once, not at the end of the batch
    for seed in (0, 2):
        assert torch.equal(by_seed[seed].latent, reference[seed][0])


def test_a_bad_request_fails_alone_and_other_sizes_cannot_join(runtime):
    bad = EditJob(image(), "x", seed=0, steps=0, size_level=64)  # 0 steps: an InputError for this edit only
    other_size = EditJob(image(), "x", seed=0, steps=2, size_level=80)
    outcomes = runtime.edit_batch([job(0), bad], join=lambda room, key: [other_size] if room == 3 else [])
    errors = {id(o.job): o.error for o in outcomes}
    assert "steps must be in" in str(errors[id(bad)])
    assert f"cannot join a batch of size {runtime.batch_key(image(), 64)}" in str(errors[id(other_size)])
    assert [o.error for o in outcomes if o.job.seed == 0 and o.job.steps == 2 and o.job is not other_size] == [None]


def test_batching_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="sequential loading frees the MLLM"):
        Step1XEditRuntime.load("tiny", max_batch=2, sequential_load=True)
    with pytest.raises(ValueError, match="max_batch must be an integer in"):
        Step1XEditRuntime.load("tiny", max_batch=0)


def test_graph_buckets_are_powers_of_two():
    assert [graph_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_forecast_is_the_serial_queue_at_batch_one_and_shares_steps_when_batched():
    serial = Forecast(max_batch=1)
    serial.step_s, serial.overhead_s = {1: 0.1}, 0.5
    # 3 edits ahead with 10 steps left in all, this one 4 steps: 4 overheads + 14 steps of 0.1 s
    assert serial.completion_s(work=10, edits=3, steps=4) == pytest.approx(4 * 0.5 + 14 * 0.1)
    batched = Forecast(max_batch=4)
    batched.step_s, batched.overhead_s = {1: 0.1, 4: 0.2}, 0.5
    assert batched.completion_s(work=10, edits=3, steps=4) == pytest.approx(4 * 0.5 + 14 / 4 * 0.2)
    assert batched.completion_s(work=0, edits=0, steps=4) == pytest.approx(0.5 + 4 * 0.1)  # alone: its own steps
    assert batched.step_time(2) == pytest.approx(0.2)  # unseen: the smaller size, scaled as if nothing were shared
    assert serial.retry_after_s(work=100, edits=9, steps=4) == 15  # 9 overheads + 100 steps, 14.5 s, rounded up


def test_adaptive_batches_go_only_as_far_as_batching_gets_more_steps_done():
    forecast = Forecast(max_batch=4)
    assert forecast.batch_limit() == 4  # nothing measured: the first batch (the warm-up's) measures max_batch
    forecast.step_s = {1: 0.0061, 4: 0.0046 * 4}  # fixed costs dominate (the toy on 2 CPU cores): batch
    assert forecast.batch_limit() == 4
    forecast.step_s |= {2: 0.0040 * 2}  # a measured smaller batch that gets more done wins
    assert forecast.batch_limit() == 2
    forecast.step_s = {1: 0.0388, 4: 0.0459 * 4}  # compute-bound (the tiny model there): one at a time
    assert forecast.batch_limit() == 1
    fixed = Forecast(max_batch=4, adaptive=False)
    fixed.step_s = dict(forecast.step_s)
    assert fixed.batch_limit() == 4
    forecast.step_s, forecast.overhead_s = {1: 0.1, 4: 0.4}, 0.0  # a tie: the smaller batch, lower latency
    assert forecast.batch_limit() == 1
    # The admission forecast predicts the batches the server runs: 8 edits ahead run one at a time.
    assert forecast.completion_s(work=16, edits=8, steps=2) == pytest.approx(18 * 0.1)


def test_padding_to_a_graph_bucket_repeats_a_real_lane_and_drops_its_result():
    """With CUDA graphs the batch is padded to a power of two; the padding rows never reach a lane. The step is
    element-wise and CFG runs per lane (the rescale on at every step: truncate 0), so padded and unpadded runs
    agree bit for bit."""
    from step1x_export.step1x_ref.sampling import Lane, denoise_lanes, guided_euler

    seen: list[int] = []

    def step(img: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # elementwise: exact per row
        seen.append(img.shape[0])
        return img * t[:, None, None] + emb

    def lanes() -> list[Lane]:
        gen = torch.Generator().manual_seed(0)
        return [Lane.of(torch.randn(1, 4, 64, generator=gen), torch.randn(1, 4, 64, generator=gen),
                        [1.0, 0.6, 0.3, 0.0][: 2 + i], guidance=1.0 + i, truncate=0.0,
                        conditioning=(torch.randn(2, 8, 64, generator=gen),))  # cond != uncond: the rescale acts
                for i in range(3)]

    plain, padded = lanes(), lanes()
    denoise_lanes(guided_euler(step), plain, max_batch=4)
    seen.clear()
    denoise_lanes(guided_euler(step), padded, max_batch=4, pad_to=graph_bucket)
    assert seen[0] == 2 * 4  # 3 lanes, padded to 4, x 2 CFG branches
    for a, b in zip(plain, padded, strict=True):
        assert a.step == b.step == a.steps and torch.equal(a.x, b.x)


def test_the_server_batches_by_default_only_where_the_runtime_can():
    from types import SimpleNamespace

    from step1x_export.serve.service import EditService
    from step1x_export.serve.spec import RuntimeSpec, ServeLimits

    can, cannot = SimpleNamespace(why_not_batched=lambda: ""), SimpleNamespace(why_not_batched=lambda: "sequential")
    assert EditService(RuntimeSpec("tiny"), ServeLimits())._max_batch(can) == 4
    assert EditService(RuntimeSpec("tiny"), ServeLimits())._max_batch(cannot) == 1
    assert EditService(RuntimeSpec("tiny", options={"max_batch": 2}), ServeLimits())._max_batch(can) == 2


def test_lane_by_lane_blocks_trace_as_one_graph_and_give_each_lane_its_alone_numbers():
    """What the runtime's compile and CUDA graphs see of a batched call: the lane-by-lane forwards trace into
    one graph per block with a static count of per-lane GEMMs (3 lanes: 3 x each Linear), and the compiled
    or eager batched block gives each lane what the block gives it alone (eager: bit for bit)."""
    from step1x_export.runtime.step.lane_gemms import lane_members, lane_modules
    from step1x_export.step1x_ref.configs import get_config
    from step1x_export.step1x_ref.dit.layers import DoubleStreamBlock
    from step1x_export.step1x_ref.dit.math import rope_table
    from step1x_export.step1x_ref.sampling import position_ids

    p = get_config("tiny").dit
    torch.manual_seed(0)
    block = DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias).eval().requires_grad_(False)
    img, txt, vec = torch.randn(6, 8, p.hidden_size), torch.randn(6, 5, p.hidden_size), torch.randn(6, p.hidden_size)
    pe = rope_table(position_ids(5, 2, 2, "v1.1"), p.axes_dim, p.theta)
    alone = [block(img[i : i + 2], txt[i : i + 2], vec[i : i + 2], pe) for i in (0, 2, 4)]
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with lane_modules(lane_members(block)):
            eager = block(img, txt, vec, pe)
            compiled = torch.compile(block, backend=record, fullgraph=True, dynamic=False)(img, txt, vec, pe)
    finally:
        torch._dynamo.reset()
    linears = sum(isinstance(m, nn.Linear) for m in block.modules())
    assert len(graphs) == 1
    gemms = (torch.addmm, torch._C._nn.linear)  # addmm where F.linear itself would; else F.linear on the rows
    assert sum(n.target in gemms for n in graphs[0].graph.nodes) == 3 * linears
    for i, (a_img, a_txt) in enumerate(alone):
        assert torch.equal(eager[0][2 * i : 2 * i + 2], a_img) and torch.equal(eager[1][2 * i : 2 * i + 2], a_txt)
        assert torch.equal(compiled[0][2 * i : 2 * i + 2], a_img)  # the recorded graph runs the same kernels
