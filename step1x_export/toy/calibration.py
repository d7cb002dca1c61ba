"""Calibration pairs for the toy model: its own instructions on its training photos (never the held-out ones)."""

from __future__ import annotations

from torch import nn

from ..calibrate.dataset import IMAGES, CalibrationPair
from ..step1x_ref.pipeline import Step1XEditPipeline
from .data import HELDOUT_PHOTOS
from .evaluate import task_scores
from .tasks import TASKS


def calibration_pairs() -> list[CalibrationPair]:
    """Every phrasing of every task on two of the calibration set's photos that the toy model trained on,
    ordered so that the first n pairs already cover the tasks, both languages and the photos."""
    photos = [name for name in IMAGES if name not in HELDOUT_PHOTOS]
    texts = [(task.name, lang, text) for phrasing in range(3) for task in TASKS
             for lang, text in (("en", task.english[phrasing]), ("zh", task.chinese[phrasing]))]
    return [CalibrationPair(photos[(i + shift) % len(photos)], text, name, lang)
            for shift in (0, 3) for i, (name, lang, text) in enumerate(texts)]


def task_psnr(pipe: Step1XEditPipeline, qmodel: nn.Module, recipe: str, *, steps: int, size_level: int,
              cfg: float = 6.0, seed: int = 0, views_per_photo: int = 2) -> dict[str, list]:
    """For a model trained on edits with exact targets (`toy`): PSNR against the target per task on the
    held-out photos, for the reference DiT and the quantized one (same MLLM, VAE, noise and loop)."""
    quantized = Step1XEditPipeline(pipe.config, qmodel, pipe.ae, pipe.embedder, device=pipe.device, dtype=pipe.dtype)

    def runner(p: Step1XEditPipeline):
        return lambda image, text: p.edit(image, text, seed=seed, steps=steps, cfg=cfg, size_level=size_level)

    return {name: task_scores(runner(p), size_level, views_per_photo=views_per_photo)
            for name, p in (("reference", pipe), (recipe, quantized))}
