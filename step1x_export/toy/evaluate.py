"""Task PSNR: how far an edit is from its exact target, on the held-out photos, per task.

An `EditFn(image, instruction) -> image` is any backend (the torch reference, ONNX Runtime, a quantized
DiT); the identity baseline returns the input, and the autoencoder ceiling is what the model's own
latent space allows (decode(encode(target))).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ..step1x_ref.imaging import pil_to_tensor, tensor_to_pil
from .data import heldout_views, shape_views
from .tasks import TASKS, psnr

EditFn = Callable[[Image.Image, str], Image.Image]


@dataclass(frozen=True)
class TaskScore:
    task: str
    model_db: float  # mean over held-out views of PSNR(output, exact target)
    identity_db: float  # the same for returning the input unchanged (inf for "no change")
    edits: int


def mean_db(values: list[float]) -> float:
    return math.inf if any(math.isinf(v) for v in values) else sum(values) / len(values)


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1], on 8-bit levels -> PIL exactly (rounding, not truncation)."""
    return Image.fromarray(x.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def task_scores(edit: EditFn, size: int, *, views_per_photo: int = 4, tasks=TASKS) -> list[TaskScore]:
    """Every task on the held-out photos' square views at `size` (what training records)."""
    _, views = heldout_views(size, views_per_photo)
    return scores_on(edit, views, tasks)


def shape_scores(edit: EditFn, shape: tuple[int, int], *, views_per_image: int = 1, tasks=TASKS) -> list[TaskScore]:
    """Every task on the held-out photos and graphics at `shape` (width, height)."""
    _, views = shape_views(*shape, per_image=views_per_image)
    return scores_on(edit, views, tasks)


def scores_on(edit: EditFn, views: torch.Tensor, tasks=TASKS) -> list[TaskScore]:
    """Edit every view with every task; view i of a task uses the task's instruction i (mod count), so English
    and Chinese phrasings are all exercised."""
    scores = []
    for task in tasks:
        target = task.target(views)
        outs = [pil_to_tensor(edit(to_pil(v), task.instructions[i % len(task.instructions)]))[0]
                for i, v in enumerate(views)]
        model = psnr(torch.stack(outs), target).tolist()
        identity = psnr(views, target).tolist()
        scores.append(TaskScore(task.name, mean_db(model), mean_db(identity), len(outs)))
    return scores


def format_scores(columns: dict[str, list[TaskScore]]) -> str:
    """A markdown table: one row per task, one column per backend, then the identity baseline."""
    names = list(columns)
    first = columns[names[0]]
    lines = ["| task | " + " | ".join(names) + " | identity |", "|---" * (len(names) + 2) + "|"]
    for i, row in enumerate(first):
        cells = [f"{columns[n][i].model_db:.2f}" for n in names]
        lines.append(f"| {row.task} | " + " | ".join(cells) + f" | {row.identity_db:.2f} |")
    return "\n".join(lines)


def roundtrip(image: Image.Image, ae) -> Image.Image:
    """decode(encode(image)) through the autoencoder: the best any DiT can do in its latent space."""
    with torch.inference_mode():
        x = pil_to_tensor(image) * 2 - 1
        out = ae.decode(ae.encode(x)).clamp(-1, 1).mul(0.5).add(0.5)
    return tensor_to_pil(out[0])
