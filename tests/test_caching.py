"""Step caching: our TeaCache decisions equal upstream's rule; a cache that computes every step is the plain step."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.bench.ladder import psnr
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.runtime.step.caching import CacheSpec, FirstBlockRule, TeaCacheRule
from step1x_export.runtime.step.split_dit import LocalDiT

STEPS = 12


def upstream_teacache(signals: list[torch.Tensor], threshold: float) -> list[bool]:
    """Upstream's rule as its inference code states it (counter, poly1d on the host, accumulate and reset)."""
    coefficients = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]
    rescale = np.poly1d(coefficients)
    acc, prev, decisions = 0.0, None, []
    for cnt, cur in enumerate(signals):
        if cnt == 0 or cnt == len(signals) - 1:
            should_calc, acc = True, 0.0
        else:
            acc += rescale(((cur - prev).abs().mean() / prev.abs().mean()).cpu().item())
            should_calc = not acc < threshold
            if should_calc:
                acc = 0.0
        prev = cur
        decisions.append(should_calc)
    return decisions


def recorded_signals(seed: int, n: int = 28) -> list[torch.Tensor]:
    """A random walk of LayerNorm-like signals [2, 32, 64] whose relative steps span 0.01 .. 0.35, where
    upstream's polynomial goes from ~0.23 (below the default threshold) to ~0.7 (above all three)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 64, generator=gen)
    out = [x]
    for i in range(n - 1):
        scale = 0.01 + 0.34 * torch.rand((), generator=gen).item() * (i % 3 != 0)
        x = x + scale * x.abs().mean() * torch.randn(2, 32, 64, generator=gen)
        out.append(x)
    return out


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_teacache_decisions_equal_upstreams(threshold, seed):
    signals = recorded_signals(seed)
    rule, dit = TeaCacheRule(threshold), LocalDiT(None)  # one process: sums and broadcasts are identities
    ours = [rule.decide(dit, i, len(signals), s) for i, s in enumerate(signals)]
    expected = upstream_teacache(signals, threshold)
    assert ours == expected
    assert 0 < expected.count(False) < len(signals) - 2  # the sequence exercises both branches


def test_first_block_rule_keeps_the_last_computed_reference():
    rule, dit = FirstBlockRule(0.1), LocalDiT(None)
    base = torch.ones(1, 4, 8)
    # 6% moves reuse; the drift accumulates against the last computed residual until it passes 10%
    decisions = [rule.decide(dit, i, 5, base * (1 + 0.06 * i)) for i in range(5)]
    assert decisions == [True, False, True, False, True]


def test_cache_spec_parsing():
    assert CacheSpec.parse("teacache") == CacheSpec("teacache", 0.2)
    assert CacheSpec.parse("fbcache:0.12") == CacheSpec("fbcache", 0.12)
    for bad in ("tea", "teacache:x", "teacache:-1"):
        with pytest.raises(ValueError, match="cache"):
            CacheSpec.parse(bad)
    with pytest.raises(ValueError, match="backend torch"):
        RuntimeOptions(backend="onnxruntime", cache="teacache")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(0).random((72, 88, 3)) * 255).astype("uint8"))


def edit(pipe, image, cache):
    rt = Step1XEditRuntime.from_pipeline(pipe, RuntimeOptions(precision="fp32", cache=cache))
    out = rt.edit(image, "add a red hat", seed=1, steps=STEPS, size_level=64)
    return out, rt


@pytest.mark.xdist_group("tiny_pipe")
def test_cached_edits_on_the_tiny_model(tiny_pipe, image):
    plain, plain_rt = edit(tiny_pipe, image, None)
    assert plain_rt.cache_stats is None
    # a threshold nothing stays under: every step computes, through the split pieces, bit for bit the plain step
    _, every = edit(tiny_pipe, image, "teacache:1e-9")
    assert (every.cache_stats.computed, every.cache_stats.reused) == (STEPS, 0)
    assert torch.equal(every.last_latent, plain_rt.last_latent)
    _, tea = edit(tiny_pipe, image, "teacache:0.6")
    assert tea.cache_stats.computed + tea.cache_stats.reused == STEPS and tea.cache_stats.reused > 0
    assert tea.cache_stats.decisions[0] and tea.cache_stats.decisions[-1]  # first and last steps always compute
    assert 30 < psnr(tea.last_latent, plain_rt.last_latent) < math.inf
    _, fb = edit(tiny_pipe, image, "fbcache:10")  # every step after the first reuses
    assert (fb.cache_stats.computed, fb.cache_stats.reused) == (1, STEPS - 1)


def test_bench_cache_rows_count_calls():
    from step1x_export.bench.caching import cache_rows, cache_table
    from step1x_export.bench.models import build_dit, dit_inputs
    from step1x_export.step1x_ref.configs import get_config

    config = get_config("tiny")
    model = build_dit(config, torch.device("cpu"), torch.float32)
    x = dit_inputs(config, 32, 6, torch.device("cpu"))
    rows = cache_rows(model, config, x, [CacheSpec.parse("teacache:1e-9"), CacheSpec.parse("fbcache:100")],
                      torch.float32)
    assert [(r.cache, r.computed, r.reused) for r in rows] == [("none", 6, 0), ("teacache:1e-09", 6, 0),
                                                                ("fbcache:100", 1, 5)]
    assert rows[1].latent_psnr_db == math.inf and rows[2].latent_psnr_db < math.inf
    assert "computed" in cache_table(rows)


def test_edit_cli_prints_calls_and_fidelity(tmp_path, image):
    from click.testing import CliRunner

    from step1x_export.cli import main

    image.save(tmp_path / "in.png")
    args = ["edit", "--model", "tiny", "--image", str(tmp_path / "in.png"), "--prompt", "add a hat", "--steps", "4",
            "--size-level", "32", "--out", str(tmp_path / "out.png")]
    result = CliRunner().invoke(main, [*args, "--cache", "fbcache:100"])
    assert result.exit_code == 0, result.output
    assert "step cache fbcache:100: DiT calls: 1 computed, 3 reused" in result.output
    assert "vs no cache: latent PSNR" in result.output and (tmp_path / "out.png").is_file()
    bad = CliRunner().invoke(main, [*args, "--cache", "teacache:x"])
    assert bad.exit_code == 2 and "threshold 'x' is not a number" in bad.output
    alone = CliRunner().invoke(main, [*args, "--cfg-degree", "2"])  # not started by torchrun
    assert alone.exit_code == 1 and "launch with `torchrun --nproc-per-node 2" in alone.output
