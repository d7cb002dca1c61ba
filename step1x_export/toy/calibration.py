"""Calibration pairs for the toy model: its own instructions on its training photos (never the held-out ones)."""

from __future__ import annotations

from ..calibrate.dataset import IMAGES, CalibrationPair
from .data import HELDOUT_PHOTOS
from .tasks import TASKS


def calibration_pairs() -> list[CalibrationPair]:
    """Every phrasing of every task on two of the calibration set's photos that the toy model trained on,
    ordered so that the first n pairs already cover the tasks, both languages and the photos."""
    photos = [name for name in IMAGES if name not in HELDOUT_PHOTOS]
    texts = [(task.name, lang, text) for phrasing in range(3) for task in TASKS
             for lang, text in (("en", task.english[phrasing]), ("zh", task.chinese[phrasing]))]
    return [CalibrationPair(photos[(i + shift) % len(photos)], text, name, lang)
            for shift in (0, 3) for i, (name, lang, text) in enumerate(texts)]
