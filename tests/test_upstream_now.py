"""v1.0 and v1.1 as upstream's current inference.py runs them: LANCZOS input resize, CFG truncation 0.93 for
both; the first v1.0 release (truncation 1.0, BICUBIC, unscaled refiner timestep) stays selectable."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.step1x_ref import pipeline as pipeline_module
from step1x_export.step1x_ref import sampling
from step1x_export.step1x_ref.configs import CONFIGS, get_config
from step1x_export.step1x_ref.imaging import edit_size, pil_to_tensor
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline, prepare_image
from step1x_export.step1x_ref.sampling import get_schedule, schedule_tensors


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 90 * 70 * 3).reshape(70, 90, 3)
    return Image.fromarray((base * 0.6 + rng.uniform(0, 100, base.shape)).astype(np.uint8))


@pytest.mark.parametrize("name", ["v1.0", "v1.1", "tiny", "tiny-v1.0"])
def test_current_releases_follow_upstream_now(name: str) -> None:
    config = get_config(name)
    assert config.cfg_truncate == 0.93 and config.input_resample == "lanczos"
    assert config.connector.time_factor == 1000.0


def test_first_release_is_selectable() -> None:
    first = get_config("v1.0-first-release")
    assert first.version == "v1.0"  # the same checkpoint files
    assert (first.cfg_truncate, first.input_resample, first.connector.time_factor) == (1.0, "bicubic", 1.0)
    assert first.dit == CONFIGS["v1.0"].dit and first.vae == CONFIGS["v1.0"].vae
    _, _, rescale = schedule_tensors(get_schedule(28, 4096), first.cfg_truncate, torch.device("cpu"))
    assert not rescale.any()
    _, _, rescale = schedule_tensors(get_schedule(28, 4096), 0.93, torch.device("cpu"))
    assert rescale.any() and not rescale.all()


def test_input_resize_uses_the_configs_filter(photo: Image.Image) -> None:
    size = edit_size(*photo.size, 48)
    for resample, pil_filter in (("lanczos", Image.Resampling.LANCZOS), ("bicubic", Image.Resampling.BICUBIC)):
        img = prepare_image(photo, 48, resample=resample)
        assert torch.equal(img.resized, pil_to_tensor(photo.resize(size, pil_filter))), resample
    lanczos, bicubic = (prepare_image(photo, 48, resample=r).resized for r in ("lanczos", "bicubic"))
    assert not torch.equal(lanczos, bicubic)


def test_the_pipeline_runs_the_configs_truncation_and_filter(photo: Image.Image, monkeypatch) -> None:
    seen = []

    def spy(*args, truncate, **kwargs):
        seen.append(truncate)
        return sampling.denoise(*args, truncate=truncate, **kwargs)

    monkeypatch.setattr(pipeline_module, "denoise", spy)
    pipe = Step1XEditPipeline.random("tiny-v1.0", seed=0)
    kw = {"seed": 1, "steps": 2, "size_level": 48}
    lanczos = np.asarray(pipe.edit(photo, "add snow", **kw))
    pipe.config = replace(pipe.config, cfg_truncate=1.0, input_resample="bicubic")
    bicubic = np.asarray(pipe.edit(photo, "add snow", **kw))
    assert seen == [0.93, 1.0] and not np.array_equal(lanczos, bicubic)
