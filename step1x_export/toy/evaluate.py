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
from .data import EVAL_SHAPES, fade, heldout_views, shape_views, size_level_for
from .tasks import LOCAL_TASKS, TASK_BY_NAME, TASKS, UNKNOWN_HELDOUT, UNKNOWN_TRAINING, psnr

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


def level_of(image: Image.Image) -> int:
    """The size level that edits `image` at its own size (the held-out views are made at the edit size)."""
    return size_level_for(*image.size)


def pipeline_edit(pipe, seed: int = 0) -> EditFn:
    """The toy's default edit (28 steps, its CFG) of a held-out view, at the view's own size."""
    from .weights import TOY_CFG, TOY_STEPS

    return lambda image, text: pipe.edit(image, text, seed=seed, steps=TOY_STEPS, cfg=TOY_CFG,
                                         size_level=level_of(image))


def task_scores(edit: EditFn, size: int, *, views_per_photo: int = 4, tasks=TASKS) -> list[TaskScore]:
    """Every task on the held-out photos' square views at `size` (what training records)."""
    _, views = heldout_views(size, views_per_photo)
    return scores_on(edit, views, tasks)


def shape_scores(edit: EditFn, shape: tuple[int, int], *, views_per_image: int = 1, tasks=TASKS) -> list[TaskScore]:
    """Every task on the held-out photos and graphics at `shape` (width, height)."""
    _, views = shape_views(*shape, per_image=views_per_image)
    return scores_on(edit, views, tasks)


# A local task is scored on the views it visibly edits (the unedited input under this PSNR from its target):
# on a picture with nothing red, "make the red things green" is "leave it alone", which no_change and the
# unknown instructions already measure.
LOCAL_VISIBLE_DB = 30.0


def scores_on(edit: EditFn, views: torch.Tensor, tasks=TASKS) -> list[TaskScore]:
    """Edit every view with every task (a local task: the views it visibly edits); view i of a task uses the
    task's instruction i (mod count), so English and Chinese phrasings are all exercised."""
    scores = []
    for task in tasks:
        scored = views[psnr(views, task.target(views)) < LOCAL_VISIBLE_DB] if task in LOCAL_TASKS else views
        target = task.target(scored)
        outs = [pil_to_tensor(edit(to_pil(v), task.instructions[i % len(task.instructions)]))[0]
                for i, v in enumerate(scored)]
        model = psnr(torch.stack(outs), target).tolist()
        identity = psnr(scored, target).tolist()
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


# How faded the near-target inputs are: the share of their colour kept (0: grey already).
FADED_SATURATIONS = (0.25, 0.5)


def faded_scores(edit: EditFn, shape: tuple[int, int], *, views_per_image: int = 1) -> dict[str, TaskScore]:
    """"Make it black and white" on faded held-out views (colour kept at each of FADED_SATURATIONS): an input
    already near its target; identity_db is how near it went in, model_db how near it came out."""
    _, views = shape_views(*shape, per_image=views_per_image)
    task = TASK_BY_NAME["black_and_white"]
    return {f"{s:g}": scores_on(edit, fade(views, s), (task,))[0] for s in FADED_SATURATIONS}


def answer_figures(edit: EditFn, views_per_image: int, log=print) -> dict:
    """What the toy answers beyond its tasks, at every evaluated shape: instructions it does not know (held-out
    phrasings never trained on, and the trained ones), scored against the unchanged input, and faded inputs
    asked for black and white."""
    from dataclasses import asdict

    unknown, faded = {}, {}
    for w, h in EVAL_SHAPES:
        unknowns = (UNKNOWN_HELDOUT, UNKNOWN_TRAINING)
        scores = shape_scores(edit, (w, h), views_per_image=views_per_image, tasks=unknowns)
        unknown[f"{w}x{h}"] = {s.task: asdict(s) for s in scores}
        fades = faded_scores(edit, (w, h), views_per_image=views_per_image)
        faded[f"{w}x{h}"] = {k: asdict(s) for k, s in fades.items()}
        log(f"unknown instructions and faded inputs at {w}x{h}")
    return {"unknown_vs_input": unknown, "faded_black_and_white": faded}
