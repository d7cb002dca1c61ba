"""v1.2 at speed: both CFG branches in one masked DiT call, CUDA graphs per text bucket, step caching, against
plain v1.2 (one DiT call per branch at its own text length, the diffusers port's calls). Batched v1.2 edits
are checked with the other versions' in test_batching.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_cudagraph_capture import fake_cuda  # noqa: F401  (the fixture)

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime.engines.torch_engine import TorchEngine
from step1x_export.runtime.options import RuntimeOptions
from step1x_export.runtime.step.cudagraph import CudaGraphed
from step1x_export.runtime.step.engine_step import engine_step_fn
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.sampling import denoise, guided_euler
from step1x_export.step1x_ref.versions import edit_version
from step1x_export.step1x_ref.versions.v1p2_joint import bucket_length

SIZE = 64


@pytest.fixture(scope="module")
def pipe() -> Step1XEditPipeline:
    return Step1XEditPipeline.random("tiny-v1.2")


def photo() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))


def encoded(pipe, instruction: str):
    version = edit_version(pipe.config)
    img = version.prepare(photo(), SIZE)
    return img, pipe.encode([instruction, ""], img.mllm_image)


def dit_step(model):
    def step(img, t, pe, emb, mask, text_embeds, text_mask):
        return model(img, pe, t, emb, mask, text_embeds, text_mask)

    return step


def one_step(pipe, dtype: torch.dtype, bucket: int, *, cond=None) -> torch.Tensor:
    """The DiT's prediction [2, 2N, 64] for both branches of one edit, per branch (bucket 0) or in one call."""
    img, texts = cond or encoded(pipe, 'Write "OK" on the wall')
    version = edit_version(pipe.config).joint(bucket)
    conditioning = [c.to(dtype) if c.is_floating_point() else c for c in version.conditioning(texts, img)]
    n = (img.width // 16) * (img.height // 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * n, 64, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.full((2,), 0.7, dtype=dtype)
    model = pipe.model.to(dtype)
    try:
        with torch.inference_mode():
            return version.step(dit_step(model))(x, t, *conditioning).double()
    finally:
        pipe.model.float()


def test_one_call_cfg_equals_the_per_branch_calls(pipe):
    """Padding masked out is the same function: float64 agrees to its rounding, and float32's one call is as
    near the float64 truth as float32's per-branch calls are (the only difference is rounding: a batch-2 GEMM,
    a masked softmax over more keys, a longer masked sum). Unmasked padding would move every output by O(1)."""
    cond = encoded(pipe, 'Write "OK" on the wall')
    lengths = [t.embedding.shape[1] for t in cond[1]]
    assert lengths[0] != lengths[1] and bucket_length(max(lengths), 64) > max(lengths)  # both branches padded
    truth = one_step(pipe, torch.float64, 0, cond=cond)
    joint64 = one_step(pipe, torch.float64, 64, cond=cond)
    scale = truth.abs().max().item()
    assert (joint64 - truth).abs().max().item() <= 1e-12 * scale  # 2^-52 per op, a few hundred ops deep
    per32, joint32 = (one_step(pipe, torch.float32, b, cond=cond) for b in (0, 64))
    fp32_error = (per32 - truth).abs().max().item()
    assert 0 < fp32_error < 1e-4 * scale
    assert (joint32 - truth).abs().max().item() <= 4 * fp32_error


def test_runtime_one_call_default_off_on_cpu_on_for_batches():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert RuntimeOptions().resolved(cpu).text_bucket == 0  # CPU alone: the exact per-branch calls
    assert RuntimeOptions(max_batch=4).resolved(cpu).text_bucket == 64  # a batch stacks one call per edit
    assert RuntimeOptions().resolved(cuda).text_bucket == 64
    assert RuntimeOptions(backend="onnxruntime").resolved(cuda).text_bucket == 0  # the mask is the torch runtime's
    with pytest.raises(ValueError, match="text_bucket 64: v1.2's one masked CFG call runs on backend torch"):
        RuntimeOptions(backend="onnxruntime", text_bucket=64)
    assert RuntimeOptions(attention="flash").resolved(cuda).text_bucket == 0  # flash takes no key mask
    with pytest.raises(ValueError, match="which FlashAttention does not take"):
        RuntimeOptions(attention="flash", text_bucket=64)
    with pytest.raises(ValueError, match="text_bucket must be an integer >= 0"):
        RuntimeOptions(text_bucket=-1)


def test_graphs_are_keyed_by_text_bucket_not_prompt_length(fake_cuda, pipe):  # noqa: F811
    """Ten prompt lengths, twice round: one capture per bucket, none again (the cache holds 4); per-length keys
    would capture 20 times. Each replay equals the eager step bit for bit."""
    bucket = 16
    version = edit_version(pipe.config).joint(bucket)
    engine = TorchEngine(pipe.model, dit_spec(pipe.config), torch.float32, torch.device("cpu"))
    update = guided_euler(version.step(engine_step_fn(engine)))
    graphed = CudaGraphed(fake_cuda.recorded(update), enabled=True, warmup=1, capacity=4)
    edits = [encoded(pipe, "make it " + "red " * (3 * i)) for i in range(10)]
    lengths = {t.embedding.shape[1] for _, texts in edits for t in texts[:1]}
    buckets = {bucket_length(n, bucket) for n in lengths}
    assert len(lengths) == 10 and 1 < len(buckets) <= 4
    n = (edits[0][0].width // 16) * (edits[0][0].height // 16)
    gen = torch.Generator().manual_seed(1)
    noise, ref = torch.randn(1, n, 64, generator=gen), torch.randn(1, n, 64, generator=gen)
    for round in range(2):
        for i, (img, texts) in enumerate(edits):
            conditioning = version.conditioning(texts, img)
            got = denoise(graphed, noise, ref, [1.0, 0.0], guidance=4.0, truncate=0.0, conditioning=conditioning)
            if round == 0 and i % 3 == 0:
                eager = denoise(update, noise, ref, [1.0, 0.0], guidance=4.0, truncate=0.0, conditioning=conditioning)
                assert torch.equal(got, eager)
    assert graphed.counts.captured == len(buckets) and graphed.counts.evicted == 0


@pytest.mark.parametrize("bucket", [0, 64])
def test_step_caching_that_computes_every_step_is_plain_v12(pipe, bucket):
    """Both layouts (a call per branch, one masked call), both policies: a threshold no step stays under computes
    every step, and the latent is plain v1.2's of that layout bit for bit; TeaCache 0.4 reuses some steps."""
    def latent(cache: str | None) -> tuple[torch.Tensor, Step1XEditRuntime]:
        rt = Step1XEditRuntime.from_pipeline(pipe, RuntimeOptions(precision="fp32", text_bucket=bucket, cache=cache))
        rt.edit(photo(), 'Write "OK"', steps=4, size_level=SIZE)
        return rt.last_latent, rt

    plain, _ = latent(None)
    for cache in ("teacache:1e-9", "fbcache:1e-9"):
        got, rt = latent(cache)
        assert rt.cache_stats.reused == 0 and torch.equal(got, plain), cache
    got, rt = latent("teacache:0.4")
    assert rt.cache_stats.reused > 0 and not torch.equal(got, plain)


def test_load_runs_v12_with_teacache():
    with Step1XEditRuntime.load("tiny-v1.2", cache="teacache:0.2") as rt:
        rt.edit(photo(), "make it red", steps=4, size_level=SIZE)
        assert rt.cache_stats.computed + rt.cache_stats.reused == 4


# Measured on tiny-v1.2 (`calibrate --model tiny-v1.2 --samples 4 --steps 4 --size-level 64 --eval 2`): fp8
# SQNR/step mean 40.3 dB, min 39.0; int8-sq (alpha 0.5) 51.9, min 51.0; the floors sit 3 dB under (as
# test_calibrate.py's do for v1.1), this test calibrating on fewer pairs and steps.
SQNR_FLOORS = {"fp8": 37.0, "int8-sq": 48.0}


def test_calibration_runs_v12s_own_prompt_path_and_quantizes_its_dit(pipe):
    """The calibration pairs go through v1.2's prompt and per-branch calls: its text-token mapping sees inputs
    (it reads v1.2's quoted-character embeddings), every step of both branches counted; W8A8 per-step SQNR
    (teacher-forced, v1.2's step) stays at the recipe's level."""
    import copy

    from step1x_export.calibrate.apply import quantize_model
    from step1x_export.calibrate.collect import collect_stats
    from step1x_export.calibrate.dataset import split_pairs
    from step1x_export.calibrate.evaluate import evaluate, summarize
    from step1x_export.calibrate.recipes import build_artifact

    calib, held = split_pairs()
    stats = collect_stats(pipe, calib[:1], steps=3, size_level=SIZE, progress=False)
    assert "text_token_mapping" in stats
    assert stats["double_blocks.0.img_attn.qkv"].calls == 1 * 3 * 2  # pairs x steps x a call per branch
    for recipe, floor in SQNR_FLOORS.items():
        qmodel = quantize_model(copy.deepcopy(pipe.model), build_artifact(pipe.model, stats, recipe))
        (report,) = evaluate(pipe, qmodel, held[:1], steps=3, size_level=SIZE, progress=False)
        assert len(report.step_sqnr) == 3 and min(report.step_sqnr) > floor, (recipe, summarize([report]))


@pytest.mark.parametrize(("degrees", "message"), [
    (dict(ring_degree=2, ulysses_degree=2), "the Ulysses exchange before it does not"),
    (dict(cfg_degree=2, text_bucket=0), "set text_bucket > 0"),
    (dict(ulysses_degree=2, text_bucket=64), "set text_bucket 0"),
    (dict(cfg_degree=2, cache="teacache"), "caching.s rule reads the cond branch"),
])
def test_v12_parallel_refuses_only_what_cannot_run(pipe, degrees, message):
    with pytest.raises(ValueError, match=message):
        Step1XEditRuntime(pipe.config, {}, RuntimeOptions(**degrees), "cpu")
    with pytest.raises(ValueError, match="no loader for stage"):  # past every check: only the absent stages stop it
        Step1XEditRuntime(pipe.config, {}, RuntimeOptions(cfg_degree=2, ulysses_degree=2), "cpu")


def test_a_batch_pads_its_edits_to_the_longest_bucket_and_each_equals_its_edit_alone_there(pipe):
    """Two edits whose texts fall in different buckets share a batch: the shorter one's texts are padded to the
    longer bucket, and its result is its edit alone at that bucket bit for bit (the batch stacks, pads and masks
    the very tensors it has alone)."""
    from step1x_export.runtime.batching import EditJob

    short, long = "make it red", "make it red " + "and blue " * 12
    lengths = [encoded(pipe, text)[1][0].embedding.shape[1] for text in (short, long)]
    assert bucket_length(lengths[0], 64) < bucket_length(lengths[1], 64) == bucket_length(lengths[1], 384) == 384
    kw = dict(seed=0, steps=2, size_level=SIZE)
    batched = Step1XEditRuntime.from_pipeline(pipe, RuntimeOptions(precision="fp32", max_batch=2))
    outcomes = {o.job.instruction: o for o in batched.edit_batch([EditJob(photo(), t, **kw) for t in (short, long)])}
    assert all(o.batch_sizes == [2, 2] for o in outcomes.values())
    for text, bucket in ((short, 384), (long, 64)):
        alone = Step1XEditRuntime.from_pipeline(pipe, RuntimeOptions(precision="fp32", text_bucket=bucket))
        alone.edit(photo(), text, **kw)
        assert torch.equal(outcomes[text].latent, alone.last_latent), text


def test_bench_times_v12_with_its_own_inputs():
    """`bench --model tiny-v1.2`: v1.2's DiT inputs (its one masked CFG call, text-token inputs), the eager
    ladder row's fidelity against fp32 on them, and a step cache that computes every step = the uncached loop."""
    from step1x_export.bench.run import BenchConfig, run_benchmark

    cfg = BenchConfig(model="tiny-v1.2", precision="fp32", sizes=(32,), steps=3, runs=1, warmup=1,
                      stages=("dit_step",), with_mllm=False, ladder=True, ladder_steps=1, cache=("teacache:1e-9",))
    report = run_benchmark(cfg, log=lambda msg: None)
    assert [s.status for s in report.stages] == ["ok"] and report.activations[0]["ok"]
    eager = report.ladder[0]
    assert eager.status == "ok" and eager.rel_err_fp32 == 0.0  # fp32 against fp32: the same masked call
    none, cached = report.cache
    assert cached["computed"] == 3 and cached["latent_psnr_db"] == math.inf
