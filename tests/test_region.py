"""RegionE (`cache="regione"`): its step plan and partition equal an independent numpy transcription of the
published rule; its DiT call on a subset of the image tokens, attending to the cached keys and values of a
full call at the same input, equals that full call's rows; up to the partition it is the plain edit bit for bit,
and so is a whole edit where every step computes every token; one compile serves every edited-token count; its
settings parse and its misuses are refused."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from step1x_export.calibrate.artifact import save_artifact
from step1x_export.calibrate.collect import collect_stats
from step1x_export.calibrate.dataset import describe, split_pairs
from step1x_export.calibrate.qlinear import QuantLinear
from step1x_export.calibrate.recipes import build_artifact
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.runtime.batching import EditJob
from step1x_export.runtime.step.cache_spec import CacheSpec
from step1x_export.runtime.step.engine_step import engine_step_fn
from step1x_export.runtime.step.region import GAMMA_V1P2, GAMMA_V1X, edited_tokens, gamma_for, region_plan
from step1x_export.runtime.step.region_spec import RegionParams
from step1x_export.runtime.step.region_step import RegionDiT, RegionUpdate
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.sampling import get_schedule, guided_euler
from step1x_export.threads import torch_threads
from step1x_export.validate import InputError

STEPS = 28
SIZE = 64  # 4 x 4 tokens with the tiny autoencoder


def published_plan(t: np.ndarray, gamma: tuple[float, ...], warmup: int, post: int, refresh: list[int],
                   cache: float) -> tuple[list[str], dict[int, int]]:
    """RegionE's pipeline loop, scheduler and manager for Step1X-Edit, transcribed step by step (float32):
    per step whether the DiT runs, on every token or the edited ones, caching keys and values; and where the
    unedited tokens jump on the steps that move them."""
    g = np.asarray(gamma, dtype=np.float16).astype(np.float32)
    pending = sorted(refresh) + [STEPS - post + 1]  # 1-based, the end appended as the manager does
    prev_refresh = next_refresh = None
    accumulate = np.float32(1)
    kinds, jumps = [], {}
    for i in range(STEPS):  # i is the manager's current step
        if i <= warmup or i > STEPS - post - 1 or i == prev_refresh:
            compute, accumulate = True, np.float32(1)
        else:
            ratio = g[i - 1] * (np.float32(1) + (t[i] - t[i - 1]))
            if ratio >= 1:
                compute, accumulate = True, np.float32(1)
            else:
                accumulate = np.float32(accumulate * ratio)
                compute = bool(np.float32(1) - accumulate > np.float32(cache))
                accumulate = np.float32(1) if compute else accumulate
        full = i <= warmup - 1 or i > STEPS - post - 1 or i == prev_refresh
        caches = i == warmup - 1 or i == prev_refresh
        kinds.append("reuse" if not compute else "capture" if caches else "full" if full else "region")
        if i == warmup - 1:  # the scheduler's step
            prev_refresh = pending.pop(0) - 1
            jumps[i] = prev_refresh
        elif prev_refresh is not None and i == prev_refresh and pending:
            next_refresh = pending.pop(0) - 1
            jumps[i] = next_refresh
        step = i + 1  # the manager's step after it
        if step == STEPS - post:
            prev_refresh = None
        elif prev_refresh is not None and step == prev_refresh + 1:
            prev_refresh = next_refresh
    return kinds, jumps


@pytest.mark.parametrize(("version", "tokens", "settings"), [
    ("v1.1", 4096, ""), ("v1.1", 64, ""), ("v1.2", 4096, ""), ("v1.1", 1024, "cache=0.04,refresh=10+20,post=3"),
    ("v1.2", 256, "warmup=4,cache=0.01,refresh="),
])
def test_plan_is_the_published_rule(version: str, tokens: int, settings: str):
    params = RegionParams.parse(settings)
    t = torch.tensor(get_schedule(STEPS, tokens)[:-1], dtype=torch.float32)
    plan = region_plan(params, t, gamma_for(version))
    kinds, jumps = published_plan(t.numpy(), GAMMA_V1P2 if version == "v1.2" else GAMMA_V1X, params.warmup,
                                  params.post, list(params.refresh), params.cache)
    letters = {"full": "F", "capture": "C", "region": "R", "reuse": "-"}
    print(version, tokens, settings, "".join(letters[k] for k in plan.kinds))
    assert list(plan.kinds) == kinds
    assert plan.jumps == jumps
    assert "reuse" in kinds and "region" in kinds  # both decisions exercised
    reused = [i for i, k in enumerate(kinds) if k == "reuse"]
    g = np.asarray(GAMMA_V1P2 if version == "v1.2" else GAMMA_V1X, dtype=np.float16).astype(np.float32)
    tt = t.numpy()
    assert [plan.ratios[i] for i in reused] == [float(g[i - 1] * (np.float32(1) + (tt[i] - tt[i - 1])))
                                                 for i in reused]


def published_partition(pred: np.ndarray, ref: np.ndarray, grid: tuple[int, int], threshold: float,
                        erode: bool) -> np.ndarray:
    """Cosine similarity per token <= threshold, then erosion by a 3x3 cross and dilation by a 5x5 square with
    zero padding, written as loops over the grid (float64)."""
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    mask = ((unit(pred) * unit(ref)).sum(-1) <= threshold).reshape(grid)
    if erode:
        h, w = grid
        p = np.pad(mask, 1)
        eroded = np.array([[p[r + 1, c + 1] and p[r, c + 1] and p[r + 2, c + 1] and p[r + 1, c] and p[r + 1, c + 2]
                            for c in range(w)] for r in range(h)])
        q = np.pad(eroded, 2)
        mask = np.array([[q[r:r + 5, c:c + 5].any() for c in range(w)] for r in range(h)])
    return np.flatnonzero(mask)


@pytest.mark.parametrize("erode", [True, False])
def test_partition_is_the_published_rule(erode: bool):
    rng = np.random.default_rng(0)
    grid = (12, 10)
    ref = rng.standard_normal((120, 64))
    pred = 1.3 * ref + 0.2 * rng.standard_normal((120, 64))  # unedited: similarity ~0.99
    edited = np.zeros(grid, dtype=bool)
    edited[3:8, 2:6] = True  # an edited block: kept (dilated) by the erosion and dilation
    edited[10, 8] = edited[0, 0] = True  # isolated tokens: removed
    edited[1, 6:10] = True  # a one-token-thick line: removed
    edited = edited.flatten()
    pred[edited] = rng.standard_normal((int(edited.sum()), 64))
    sim = (pred * ref).sum(-1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.abs(sim - 0.88).min() > 1e-3  # no token on the threshold: float32 vs float64 cannot flip one
    expected = published_partition(pred, ref, grid, 0.88, erode)
    got = edited_tokens(torch.from_numpy(pred).float(), torch.from_numpy(ref).float(), grid,
                        RegionParams(erode=erode))
    assert got.tolist() == expected.tolist()
    assert (len(expected) > edited.sum()) if erode else (len(expected) == edited.sum())  # dilated / as marked


def image(side: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny_rt():
    with Step1XEditRuntime.load("tiny", backend="torch", device="cpu", compile=False) as rt:
        yield rt


def fp8_artifact(folder: Path) -> Path:
    pipe = Step1XEditPipeline.random("tiny", seed=0)
    pairs = split_pairs()[0][:1]
    stats = collect_stats(pipe, pairs, steps=2, size_level=32, progress=False)
    return save_artifact(build_artifact(pipe.model, stats, "fp8", calibration=describe(pairs)), folder / "fp8.st")


@pytest.mark.isa  # a GEMM over fewer rows may pick another kernel, rounding differently
@pytest.mark.parametrize("model", ["tiny", "tiny-v1.2", "tiny-fp8"])
def test_region_call_attends_like_the_full_call(model: str, tiny_rt: Step1XEditRuntime, tmp_path: Path):
    """v1.1: one call for both CFG branches; v1.2: one per branch, each with its own cache; an FP8 artifact's
    W8A8 blocks (static activation scales: a token's codes do not depend on the others)."""
    with contextlib.ExitStack() as stack:
        quant = {"quant": fp8_artifact(tmp_path)} if model == "tiny-fp8" else {}
        rt = tiny_rt if model == "tiny" else stack.enter_context(
            Step1XEditRuntime.load(model.removesuffix("-fp8"), backend="torch", device="cpu", compile=False, **quant))
        lane = rt.prepare_lane(EditJob(image(), "add a hat", steps=STEPS, size_level=SIZE))
        engine = rt.stages.load("dit")
        assert any(isinstance(m, QuantLinear) for m in engine.module.modules()) == bool(quant)
        n = lane.x.shape[1]
        x = lane.x + 0.3 * torch.randn_like(lane.x)  # any latent: the two calls see the same one
        t = torch.tensor([0.7, 0.7])
        dit = RegionDiT(engine, rt.version.dit_inputs)
        region_fn, plain_fn = rt.version.step(dit), rt.version.step(engine_step_fn(engine))
        dit.start(region=False)
        full = region_fn(torch.cat([x, lane.ref], dim=1).repeat(2, 1, 1), t, *lane.conditioning)
        plain = plain_fn(torch.cat([x, lane.ref], dim=1).repeat(2, 1, 1), t, *lane.conditioning)
        assert torch.equal(full, plain)  # recording the keys and values changes nothing
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 3].sort().values
        for edited in (subset, torch.arange(n)):
            dit.queried = edited
            dit.start(region=True)
            region = region_fn(x[:, edited].repeat(2, 1, 1), t, *lane.conditioning)
            rows = full[:, edited]
            err = float((region - rows).norm() / rows.norm())
            print(f"{model}: {len(edited)}/{n} tokens: relative error {err:.2e}")
            assert err < 1e-5  # the same fp32 maths; only the GEMMs' row blocking differs


class AtenCounts(TorchDispatchMode):
    """How many times each aten operation ran."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def python_hooks(fn: Callable[[], object]) -> int:
    """Calls into a Python `__torch_function__` (a mode's or a tensor subclass's) while fn runs."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event == "call" and frame.f_code.co_name == "__torch_function__"

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return count


def test_region_call_does_no_per_call_bookkeeping(tiny_rt: Step1XEditRuntime):
    """The work of a region call outside the blocks' maths: its positions and RoPE rows are gathered once per
    partition (not per call), and the key/value window runs Python for the attention and the RoPE operations
    that feed it (about 15 per block), not for each of a block's hundred-odd operations (a mode over the block:
    on the toy's CPU region steps that was a tenth of the step)."""
    lane = tiny_rt.prepare_lane(EditJob(image(), "add a hat", steps=STEPS, size_level=SIZE))
    engine = tiny_rt.stages.load("dit")
    dit = RegionDiT(engine, tiny_rt.version.dit_inputs)
    region_fn, t = tiny_rt.version.step(dit), torch.tensor([0.7, 0.7])
    dit.start(region=False)
    region_fn(torch.cat([lane.x, lane.ref], dim=1).repeat(2, 1, 1), t, *lane.conditioning)
    dit.queried = torch.tensor([1, 2, 5, 9])
    img = lane.x[:, dit.queried].repeat(2, 1, 1)

    def call() -> None:
        dit.start(region=True)
        region_fn(img, t, *lane.conditioning)

    first, second = AtenCounts(), AtenCounts()
    with first:
        call()
    with second:
        call()
    print(f"gathers (aten index): first region call {first.counts['index']}, second {second.counts['index']}")
    assert first.counts["index"] == 1 and second.counts["index"] == 0  # the RoPE rows, once
    blocks = len(engine.module.double_blocks) + len(engine.module.single_blocks)
    hooks = python_hooks(call)
    print(f"Python __torch_function__ calls per block: {hooks / blocks:.1f}")
    assert hooks <= 16 * blocks


def test_full_steps_are_the_plain_steps(tiny_rt: Step1XEditRuntime):
    """Up to the partition RegionE is the plain edit bit for bit: the warm-up steps are its update, and the
    recording step's own CFG and Euler (every token edited at threshold 2: none jumps) equal it too."""
    lane = tiny_rt.prepare_lane(EditJob(image(), "add a hat", steps=STEPS, size_level=SIZE))
    engine = tiny_rt.stages.load("dit")
    plain = guided_euler(tiny_rt.version.step(engine_step_fn(engine)))
    region = RegionUpdate(engine, tiny_rt.version, RegionParams(threshold=2.0), plain)
    region.begin(lane, (4, 4))
    x_plain = x_region = lane.x
    for i in range(6):
        step = (lane.ref, lane.guidance, lane.t[i : i + 1], lane.dt[i : i + 1], lane.rescale[i : i + 1])
        x_plain, x_region = plain(x_plain, *step, *lane.conditioning), region(x_region, *step, *lane.conditioning)
        assert torch.equal(x_region, x_plain)
    assert region.stats.kinds == ["full"] * 5 + ["capture"] and len(region.stats.edited[5]) == lane.x.shape[1]


def test_the_key_value_cache_is_dropped_once_no_step_reads_it(tiny_rt: Step1XEditRuntime):
    """The recorded keys and values (12.4 GB at 1024 x 1024) are held from the recording step to the last region
    step and dropped after it, not kept until the next edit."""
    lane = tiny_rt.prepare_lane(EditJob(image(), "add a hat", steps=STEPS, size_level=SIZE))
    engine = tiny_rt.stages.load("dit")
    plain = guided_euler(tiny_rt.version.step(engine_step_fn(engine)))
    region = RegionUpdate(engine, tiny_rt.version, RegionParams(threshold=0.1, erode=False), plain)
    region.begin(lane, (4, 4))
    x, held = lane.x, []
    for i in range(STEPS):
        step = (lane.ref, lane.guidance, lane.t[i : i + 1], lane.dt[i : i + 1], lane.rescale[i : i + 1])
        x = region(x, *step, *lane.conditioning)
        held.append(len(region.dit.caches))  # after the step
    kinds = region.stats.kinds
    last = max(i for i, kind in enumerate(kinds) if kind == "region")
    assert 0 < len(region.stats.edited[5]) < lane.x.shape[1]
    assert all(held[kinds.index("capture") : last]) and not any(held[last:]), (kinds, held)


@pytest.mark.parametrize("model", ["tiny", "tiny-v1.2"])
def test_every_token_every_step_is_the_plain_edit(model: str, tiny_rt: Step1XEditRuntime):
    """Every token edited (threshold 2, no erosion), no velocity reused (cache 0) and the reference tokens
    recomputed in the region calls (ref_kv 0): each of the 28 steps computes every token, through the recording
    and region calls' key/value windows, and the whole edit is the plain edit bit for bit (v1.2: per branch).
    With the published cached reference keys and values it is not (the reference tokens' modulation follows t)."""
    every = "regione:threshold=2,erode=0,cache=0"
    job = dict(seed=0, steps=STEPS, size_level=SIZE)
    with contextlib.ExitStack() as stack:
        def load(**options: str) -> Step1XEditRuntime:
            return stack.enter_context(Step1XEditRuntime.load(model, backend="torch", device="cpu", compile=False,
                                                              **options))

        plain = tiny_rt if model == "tiny" else load()
        region = load(cache=f"{every},ref_kv=0")
        plain.edit(image(), "add a hat", **job)
        region.edit(image(), "add a hat", **job)
        stats = region.stats().cache
        n = stats["image_tokens"]
        region_steps = STEPS - 6 - 1 - 2  # all but the warm-up, the refresh and the post steps
        assert stats["kinds"].count("region") == region_steps and stats["reused"] == 0
        assert stats["tokens"] == [2 * n] * STEPS
        assert torch.equal(region.last_latent, plain.last_latent)
        if model == "tiny":
            cached = load(cache=every)
            cached.edit(image(), "add a hat", **job)
            assert cached.stats().cache["tokens"].count(n) == region_steps  # the reference not queried
            err = float((cached.last_latent - plain.last_latent).norm() / plain.last_latent.norm())
            print(f"cached reference keys and values: relative error {err:.2e} vs the plain edit")
            assert not torch.equal(cached.last_latent, plain.last_latent)


def test_regione_edit_reports_its_plan():
    with Step1XEditRuntime.load("tiny", backend="torch", device="cpu", compile=False,
                                cache="regione:threshold=0.1,erode=0") as rt:
        rt.edit(image(), "add a hat", seed=0, steps=STEPS, size_level=SIZE)
        stats = rt.stats().cache
        n = stats["image_tokens"]
        edited = stats["edited"][5]
        assert stats["edited"] == {5: edited, 15: edited}  # partitioned once, kept through the refresh
        assert 0 < len(edited) < n
        expected = {"full": 2 * n, "capture": 2 * n, "region": len(edited), "reuse": 0}
        assert stats["tokens"] == [expected[k] for k in stats["kinds"]]
        assert stats["computed"] + stats["reused"] == STEPS and stats["reused"] > 0
        with pytest.raises(InputError, match="steps=28"):
            rt.edit(image(), "add a hat", steps=10)
        with pytest.raises(ValueError, match="batched edits"):
            rt.check_batching()


def test_regione_settings():
    assert CacheSpec.parse("regione").region == RegionParams()
    spec = CacheSpec.parse("regione:cache=0.03,refresh=12+20")
    assert spec.region == RegionParams(cache=0.03, refresh=(12, 20))
    assert CacheSpec.parse(str(spec)) == spec and str(CacheSpec.parse("regione")) == "regione"
    assert CacheSpec.parse("regione:0.9").region == RegionParams(threshold=0.9)
    every = CacheSpec.parse("regione:threshold=2,erode=0,cache=0,ref_kv=0")
    assert every.region == RegionParams(threshold=2, erode=False, cache=0, ref_kv=False)
    assert CacheSpec.parse(str(every)) == every
    for bad, why in [("regione:refresh=7", r"refresh steps must lie in \(7, 25\]"), ("regione:warmup=0", "warmup"),
                     ("regione:refresh=12+13", "adjacent"), ("regione:speed=2", "key=value"),
                     ("regione:cache=x", "cache='x'")]:
        with pytest.raises(ValueError, match=why):
            CacheSpec.parse(bad)


@pytest.mark.isa  # compiled vs eager
@pytest.mark.xdist_group("compile")  # one worker: inductor's C++ builds use both cores
@pytest.mark.usefixtures("fresh_compiles")
def test_one_compile_serves_every_edited_token_count():
    """Five edited-token counts: two edits (new partition, new key/value caches), then three region calls of the
    same compiled DiT on other subsets. The blocks compile for the full steps, the recording steps and the region
    steps on the first edit, and never again; the compiled edit matches the eager one."""
    cache = "regione:threshold=0,erode=0"
    seeds = (5, 4)  # 12 and 4 of the 16 tokens edited
    with Step1XEditRuntime.load("tiny", backend="torch", device="cpu", compile=True, cache=cache) as rt, \
            Step1XEditRuntime.load("tiny", backend="torch", device="cpu", compile=False, cache=cache) as eager:
        eager.edit(image(seed=seeds[0]), "add a hat", seed=seeds[0], steps=STEPS, size_level=SIZE)
        counts, compiles = [], []
        for seed in seeds:
            rt.edit(image(seed=seed), "add a hat", seed=seed, steps=STEPS, size_level=SIZE)
            counts.append(len(rt.stats().cache["edited"][5]))
            compiles.append(rt.stats().compiles)
            if seed == seeds[0]:
                assert eager.stats().cache["edited"] == rt.stats().cache["edited"]
                err = float((rt.last_latent - eager.last_latent).norm() / eager.last_latent.norm())
                print(f"compiled vs eager RegionE: relative error {err:.2e}")
                assert err < 1e-5  # inductor reorders fp32 reductions (the bound of test_compile)
        lane = rt.prepare_lane(EditJob(image(), "add a hat", steps=STEPS, size_level=SIZE))
        dit = RegionDiT(rt.stages.load("dit"), rt.version.dit_inputs)
        region_fn, t = rt.version.step(dit), torch.tensor([0.7, 0.7])
        # the edits' thread count: a compiled graph is guarded on it (another count recompiles)
        with torch_threads(rt.options.threads):
            dit.start(region=False)
            region_fn(torch.cat([lane.x, lane.ref], dim=1).repeat(2, 1, 1), t, *lane.conditioning)
            for count in (2, 7, 10):
                dit.queried = torch.linspace(0, lane.x.shape[1] - 1, count).round().long()  # spread over the grid
                dit.start(region=True)
                region_fn(lane.x[:, dit.queried].repeat(2, 1, 1), t, *lane.conditioning)
                counts.append(count)
                compiles.append(rt.stats().compiles)
        print(f"edited tokens {counts}, compiles after each {compiles}")
        assert len(set(counts)) == 5 and min(counts) > 1  # five counts (one token would specialise)
        assert compiles == [compiles[0]] * 5
        assert compiles[0] == 3 * 2  # (full, recording, region) x (double, single) block


def test_regione_runs_each_v12_branch_as_its_own_call():
    """RegionE's key/value cache is per DiT call: v1.2's one masked CFG call is off with it, even on CUDA where it is
    the default, and asking for both is refused by name."""
    cuda = torch.device("cuda")
    assert RuntimeOptions(cache="teacache").resolved(cuda).text_bucket > 0
    assert RuntimeOptions(cache="regione").resolved(cuda).text_bucket == 0
    with pytest.raises(ValueError, match="text_bucket 64: RegionE"):
        RuntimeOptions(cache="regione", text_bucket=64)
