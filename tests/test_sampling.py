"""Schedule, CFG rescale, packing and position ids against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from step1x_export.step1x_ref.imaging import edit_size
from step1x_export.step1x_ref.sampling import (
    cfg_combine,
    cfg_norm_factor,
    denoise,
    get_schedule,
    guided_euler,
    pack,
    position_ids,
    schedule_mu,
    unpack,
)


def shifted(t: float, mu: float) -> float:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 2688])
def test_schedule_matches_formula(seq_len: int) -> None:
    mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)
    assert schedule_mu(seq_len) == pytest.approx(mu, abs=1e-12)
    ts = get_schedule(28, seq_len)
    assert len(ts) == 29 and ts[0] == pytest.approx(1.0) and ts[-1] == 0.0
    for i in (1, 7, 14, 27):
        assert ts[i] == pytest.approx(shifted(1 - i / 28, mu), rel=1e-6)
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


def test_schedule_known_points() -> None:
    # mu(256) = 0.5: t=0.5 -> e^0.5 / (e^0.5 + 1)
    assert get_schedule(2, 256)[1] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), rel=1e-6)
    assert get_schedule(4, 4096)[2] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), rel=1e-6)


def test_cfg_norm_factor_below_at_above_one() -> None:
    n = torch.tensor([0.25, 1.0, 4.0])
    assert torch.allclose(cfg_norm_factor(n), torch.tensor([1.0, 1.0, 4.0**0.4]))


def test_cfg_combine_rescale_per_token() -> None:
    cond = torch.zeros(1, 2, 4)
    uncond = torch.zeros(1, 2, 4)
    cond[0, 0] = torch.tensor([3.0, 4.0, 0, 0])  # norm 5 -> divided by 5**0.4
    cond[0, 1] = torch.tensor([0.3, 0.4, 0, 0])  # norm 0.5 -> unchanged
    out = cfg_combine(cond, uncond, 6.0, rescale=True)
    assert torch.allclose(out[0, 0], 6.0 * cond[0, 0] / 5**0.4)
    assert torch.allclose(out[0, 1], 6.0 * cond[0, 1])
    assert torch.allclose(cfg_combine(cond, uncond, 6.0, rescale=False), 6.0 * cond)


def test_pack_unpack_roundtrip() -> None:
    x = torch.randn(1, 16, 12, 20)
    tokens = pack(x)
    assert tokens.shape == (1, 6 * 10, 64)
    assert torch.equal(unpack(tokens, 96, 160), x)


def test_position_ids_per_version() -> None:
    ids10 = position_ids(5, 2, 3, "v1.0")[0]
    ids11 = position_ids(5, 2, 3, "v1.1")[0]
    assert ids10.shape == (5 + 12, 3)
    assert torch.equal(ids10[:5], torch.zeros(5, 3))
    assert ids10[5 + 4].tolist() == [0, 1, 1]  # noisy token (row 1, col 1)
    assert torch.equal(ids10[5:11], ids10[11:])  # v1.0: reference ids identical to noisy
    assert ids11[11 + 4].tolist() == [1, 2, 2]  # v1.1: (1, row + 1, col + 1)


@pytest.mark.parametrize(
    ("w", "h", "level", "expected"),
    [
        (512, 512, 512, (512, 512)),
        (640, 427, 512, (624, 416)),
        (427, 640, 1024, (832, 1248)),
        (1000, 300, 768, (1392, 416)),
    ],
)
def test_edit_size_rule(w: int, h: int, level: int, expected: tuple[int, int]) -> None:
    out = edit_size(w, h, level)
    assert out == expected
    assert out[0] % 16 == 0 and out[1] % 16 == 0
    assert abs(out[0] / out[1] - w / h) < 0.05


def test_denoise_euler_on_noisy_half_only() -> None:
    x = torch.randn(1, 4, 64)
    ref = torch.randn(1, 4, 64)
    seen = []

    def step(img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(img.clone())
        return torch.ones_like(img) * torch.tensor([1.0, 0.0])[:, None, None]  # cond 1, uncond 0

    ts = [1.0, 0.5, 0.0]
    out = denoise(guided_euler(step), x, ref, ts, guidance=2.0, truncate=1.0)
    assert torch.allclose(out, x - 2.0)  # two Euler steps of dt=-0.5 with pred = 0 + 2 * (1 - 0)
    assert all(torch.equal(s[:, 4:], ref.expand(2, -1, -1)) for s in seen)
