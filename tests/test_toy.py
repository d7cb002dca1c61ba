"""The trained toy model: shipped weights load through the official-layout loader, it really edits, and
training is deterministic."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli import main
from step1x_export.step1x_ref.imaging import edit_size, pil_to_tensor
from step1x_export.step1x_ref.weights.loading import DIT_FILES, QWEN_DIR, VAE_FILE
from step1x_export.toy import small_pipeline
from step1x_export.toy.data import EVAL_SHAPES, HELDOUT_PHOTOS, TRAIN_PHOTOS, heldout_views
from step1x_export.toy.evaluate import to_pil
from step1x_export.toy.tasks import TASK_BY_NAME, TASKS, psnr, task_for
from step1x_export.toy.train import TrainPlan, train
from step1x_export.toy.weights import FIGURES_FILE, TOY_CFG, TOY_SIZE, TOY_STEPS, WEIGHTS_DIR

pytestmark = pytest.mark.xdist_group("toy")
MARGIN_DB = 5.0  # every task over returning the input, at every evaluated shape
CEILING_DB = 25.0  # the autoencoder's held-out reconstruction at size level 128


@pytest.fixture(scope="module")
def toy():
    # One thread: on a shared 2-core runner, two OpenMP threads wait on each other (several times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield small_pipeline("toy")
    torch.set_num_threads(threads)


def test_shipped_weights_official_layout_and_size() -> None:
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert (WEIGHTS_DIR / DIT_FILES["v1.1"][0]).is_file() and (WEIGHTS_DIR / VAE_FILE).is_file()
    assert (WEIGHTS_DIR / QWEN_DIR / "config.json").is_file()
    assert sum(p.stat().st_size for p in files) <= 25e6
    assert not set(HELDOUT_PHOTOS) & set(TRAIN_PHOTOS)


def test_targets_are_exact() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(TASK_BY_NAME["mirror"].target(TASK_BY_NAME["mirror"].target(x)), x)
    assert torch.equal(TASK_BY_NAME["swap_red_blue"].target(x)[:, 0], x[:, 2])
    grey = TASK_BY_NAME["black_and_white"].target(x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert all(task_for(text) is task for task in TASKS for text in task.instructions)


def test_the_local_task_turns_only_strong_reds_green() -> None:
    """"make the red things green": a saturated red becomes the same green, orange (the coffee photo's wooden
    table), a dull red, grey and blue stay exactly as they were, and the edge between is soft (no jump)."""
    from step1x_export.toy.tasks import LOCAL_TASKS, red_weight

    task = TASK_BY_NAME["red_to_green"]
    assert task in LOCAL_TASKS and task_for("make the red things green") is task and task not in TASKS
    colours = torch.tensor([[0.75, 0.125, 0.125], [0.8, 0.45, 0.2], [0.5, 0.4, 0.4], [0.5, 0.5, 0.5], [0.1, 0.2, 0.8]])
    x = colours.T[None, :, None, :]  # [1, 3, 1, 5]
    out = task.target(x)
    assert torch.equal(out[0, :, 0, 0], torch.tensor([0.125, 0.75, 0.125]))
    assert torch.equal(out[..., 1:], x[..., 1:])
    hues = torch.linspace(0, 30, 301)  # degrees from red at chroma 0.6: the weight falls by at most one ramp step
    g = 0.2 + 0.6 * hues / 60
    ramp = red_weight(torch.stack([torch.full_like(g, 0.8), g, torch.full_like(g, 0.2)])[None, :, None])
    assert ramp[..., 0].item() == 1 and ramp[..., -1].item() == 0
    assert ramp.diff(dim=-1).abs().max() <= 0.1 / 6 + 1e-6


def test_painted_red_things_give_the_local_task_something_to_edit() -> None:
    """The fine-tune's images get red things painted in (the training photos hold almost none): seeded, on 8-bit
    levels, strongly red on average where the photos were not (so the local task's target differs from the
    input), and a share of 0 leaves the pool as it was."""
    from step1x_export.toy.data import TRAIN_PHOTOS, image_batch, paint_some, photo_tensors
    from step1x_export.toy.tasks import red_weight

    photos = photo_tensors(TRAIN_PHOTOS[:4], max_short_side=128)
    pool = image_batch(photos, 6, 64, 48, torch.Generator().manual_seed(3), drawn_share=0.0)
    painted = [paint_some(pool, 1.0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(painted[0], painted[1])
    assert torch.equal(painted[0], painted[0].mul(255).round().div(255))
    assert red_weight(painted[0]).mean() > red_weight(pool).mean() + 0.05
    assert torch.equal(paint_some(pool, 0.0, torch.Generator().manual_seed(7)), pool)


def test_fading_keeps_luma_and_the_asked_share_of_colour() -> None:
    """A faded input (the near-target case for black and white): its black-and-white target is the input's,
    and it is nearer that target the less colour it keeps."""
    from step1x_export.toy.data import fade

    _, views = heldout_views(64, per_photo=1)
    bw = TASK_BY_NAME["black_and_white"].target
    assert torch.equal(fade(views, 0.0), bw(views).mul(255).round().div(255))
    nearness = [psnr(fade(views, s), bw(views)).mean().item() for s in (0.5, 0.25, 0.1)]
    assert nearness == sorted(nearness)


def test_edit_beats_identity_on_a_heldout_photo(toy, task: str = "invert") -> None:
    """One held-out view (the astronaut's centre square at the training size), English and Chinese."""
    _, views = heldout_views(TOY_SIZE, per_photo=1)
    view = views[:1]
    t = TASK_BY_NAME[task]
    target = t.target(view)
    identity = psnr(view, target).item()
    for text in (t.english[0], t.chinese[0]):
        out = toy.edit(to_pil(view[0]), text, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=TOY_SIZE)
        assert psnr(pil_to_tensor(out), target).item() > identity + 3, text


def test_teacache_keeps_the_edit(toy) -> None:
    """Step caching judged by the edit's correctness: TeaCache at 0.4 reuses DiT calls on the trained model
    and its edit stays within 0.5 dB of the uncached one, far above returning the input."""
    from step1x_export.toy.quality import cached_edit

    _, views = heldout_views(TOY_SIZE, per_photo=1)
    t = TASK_BY_NAME["invert"]
    target = t.target(views[:1])
    reused: list[float] = []
    cached = cached_edit(toy, 0.4, reused)(to_pil(views[0]), t.english[0])
    plain = toy.edit(to_pil(views[0]), t.english[0], seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=TOY_SIZE)
    cached_db, plain_db = (psnr(pil_to_tensor(im), target).item() for im in (cached, plain))
    assert reused[0] > 0.2, reused
    assert abs(cached_db - plain_db) < 0.5, (cached_db, plain_db)
    assert cached_db > psnr(views[:1], target).item() + 3


def test_regione_keeps_a_local_edit() -> None:
    """RegionE judged by the edit's correctness on a trained model, on an edit that changes part of the picture:
    "swap red and blue" on the coffee photo (held out) made grey outside a centred disc (grey is its own swap),
    at the toy's default size. The uncached edit does the task (well over the unchanged input); RegionE computes
    only part of the tokens after its partition, stays >= 30 dB from the uncached edit (RegionE publishes
    30.5-32 dB on Step1X-Edit) and within 0.5 dB of its PSNR against the exact target."""
    from step1x_export.calibrate.evaluate import psnr_db
    from step1x_export.runtime import Step1XEditRuntime
    from step1x_export.toy.data import coffee_view
    from step1x_export.toy.demo import task_psnr

    text = "swap red and blue"
    image = coffee_view(*edit_size(600, 400, TOY_SIZE), local=True)  # the photo's 3:2 at the default level
    outs, stats = {}, {}
    for cache in (None, "regione"):
        with Step1XEditRuntime.load("toy", backend="torch", device="cpu", compile=False, cache=cache) as rt:
            outs[cache] = rt.edit(image, text, seed=0, steps=TOY_STEPS, size_level=TOY_SIZE)
            stats[cache] = rt.stats().cache
    assert outs[None].size == image.size == (192, 128)
    (plain_db, identity_db), (region_db, _) = (task_psnr(image, outs[c], text) for c in (None, "regione"))
    assert plain_db > identity_db + 3, (plain_db, identity_db)  # 24.65 vs 19.11 dB on the Zen 5 EPYC
    edited = next(iter(stats["regione"]["edited"].values()))
    assert 0 < len(edited) < stats["regione"]["image_tokens"]
    assert psnr_db(outs["regione"], outs[None]) >= 30
    assert abs(region_db - plain_db) <= 0.5, (region_db, plain_db)


def test_training_photo_from_a_missing_package_names_the_extra(monkeypatch) -> None:
    import sys

    from step1x_export.toy.data import load_photo

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"sklearn:china.*step1x-export\[train\]"):
        load_photo("sklearn:china")
    with pytest.raises(ValueError, match="unknown photo source 'nope'"):
        load_photo("nope:x")


def test_figures_recorded_by_training_beat_identity_at_every_shape() -> None:
    """What training measured on the held-out photos and graphics: at every evaluated shape (squares, 3:2 both
    ways, past size level 128) every task beats returning the input, mirror included (it moves content across
    token grids of every width); and the autoencoder's reconstruction at size level 128."""
    figures = json.loads((WEIGHTS_DIR / FIGURES_FILE).read_text())
    assert set(figures["tasks"]) == {f"{w}x{h}" for w, h in EVAL_SHAPES}
    for shape, rows in figures["tasks"].items():
        margins = {row["task"]: row["model_db"] - row["identity_db"] for row in rows if row["task"] != "no_change"}
        assert all(m >= MARGIN_DB for m in margins.values()), (shape, margins)
    assert figures["autoencoder_db"]["128x128"] >= CEILING_DB


def test_shipped_weights_were_made_by_the_default_plan() -> None:
    """`python -m step1x_export.toy.train` retrains the shipped weights: the plan figures.json records is
    today's default (a changed default needs a retrain and its figures)."""
    from step1x_export.toy.plan import plan_from_json

    figures = json.loads((WEIGHTS_DIR / FIGURES_FILE).read_text())
    assert plan_from_json(figures["plan"]) == TrainPlan()
    assert figures["threads"] == TrainPlan().threads


@pytest.mark.parametrize("threads", [1, 2])
def test_training_is_deterministic(threads: int) -> None:
    """Two seeded runs of a few steps of every phase give bit-identical weights, which training did change, on
    two threads (how the shipped weights were made) and on one (each count sums its own way: compared only
    with itself)."""
    plan = replace(TrainPlan.quick(0), threads=threads)
    a, b = (train(plan, log=lambda _: None) for _ in range(2))
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    for name, tensor in a.ae.state_dict().items():
        assert torch.equal(tensor, b.ae.state_dict()[name]), name
    assert a.model.final_layer.linear.weight.abs().sum() > 0  # initialised to zero


def test_the_fine_tune_from_saved_first_phase_weights_equals_the_run_from_scratch(tmp_path: Path) -> None:
    """The shipped weights were fine-tuned from the saved first phase (`--first-phase`): that must give the bits
    a from-scratch run gives (the fine-tune draws from its own generators and reads only the weights), and
    the fine-tune must change the weights. A first phase made by another plan is refused."""
    from dataclasses import asdict

    from step1x_export.toy.train import tune_from

    plan = replace(TrainPlan.quick(0), threads=1)
    whole = train(plan, log=lambda _: None)
    first = train(replace(plan, tune_steps=0), log=lambda _: None)
    first.save_pretrained(tmp_path)
    (tmp_path / FIGURES_FILE).write_text(json.dumps({"plan": plan.first_phase(), "train_seconds": 1.0}))
    tuned = tune_from(tmp_path, plan, log=lambda _: None)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, tuned.model.state_dict()[name]), name
    assert not torch.equal(whole.model.img_in.weight, first.model.img_in.weight)
    (tmp_path / FIGURES_FILE).write_text(json.dumps({"plan": {**asdict(plan), "dit_steps": 3}}))
    with pytest.raises(ValueError, match="another first phase"):
        tune_from(tmp_path, plan, log=lambda _: None)


def test_demo_edits_a_heldout_photo(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "trained weights" in result.output and "PSNR vs the exact target" in result.output
    w, h = edit_size(600, 400, TOY_SIZE)  # the coffee photo, whole (3:2)
    assert Image.open(out).size == (w, h)
    zoom = -(-256 // h)  # input | edit | exact target, each enlarged to >= 256 px high, 8 px apart
    assert Image.open(tmp_path / "demo_side_by_side.png").size == (w * zoom * 3 + 2 * 8, h * zoom)


def test_shape_views_hold_photos_and_graphics_at_every_shape() -> None:
    """The per-shape tables' views: each held-out photo and graphic at the asked width x height (the edit size
    rule keeps that size at its level), a logo's transparency shown over white."""
    from step1x_export.step1x_ref.imaging import edit_size
    from step1x_export.toy.data import EVAL_SHAPES, HELDOUT_GRAPHICS, shape_views, size_level_for

    assert not set(HELDOUT_GRAPHICS) & set(TRAIN_PHOTOS)
    for w, h in EVAL_SHAPES:
        names, views = shape_views(w, h)
        assert views.shape == (len(HELDOUT_PHOTOS) + len(HELDOUT_GRAPHICS), 3, h, w)
        assert edit_size(w, h, size_level_for(w, h)) == (w, h)
    logo = shape_views(64, 64, names=("logo",))[1][0]
    assert torch.equal(logo[:, 0, 0], torch.ones(3))  # a transparent corner, over white


def test_quality_shapes_are_parsed_or_refused() -> None:
    import argparse

    from step1x_export.toy.quality import parse_shape

    assert parse_shape("96x64") == (96, 64)
    for bad in ("96", "100x64", "ax64"):
        with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT|multiples of 16"):
            parse_shape(bad)


def test_plan_overrides_change_fields_and_name_what_is_wrong() -> None:
    from step1x_export.toy.plan import with_overrides

    plan = with_overrides(TrainPlan(), ["dit_steps=7000", 'task_weights=[["swap_red_blue", 1.5]]', "levels=[64, 96]"])
    assert (plan.dit_steps, plan.task_weights, plan.levels) == (7000, (("swap_red_blue", 1.5),), (64, 96))
    assert with_overrides(plan, []) == plan
    for bad, message in (("dit_step=3", "FIELD one of seed, threads, levels"), ("dit_steps=a", "must be JSON"),
                         ("dit_steps=1.5", f"dit_steps takes a value like {TrainPlan().dit_steps}"),
                         ("ema", "expected FIELD=VALUE"), ("threads=0", "threads must be at least 1, got 0")):
        with pytest.raises(ValueError, match=message):
            with_overrides(TrainPlan(), [bad])
