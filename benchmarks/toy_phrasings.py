"""Every phrasing of every toy task on one held-out photo, whole, at several size levels: how far each edit is
from its own exact target, and which task's target it is nearest to (an edit nearer another task's target is
an instruction the model misread at that shape).

    PYTHONPATH=$PWD python benchmarks/toy_phrasings.py [--weights DIR] [--levels 96 112 128 144 160]
        [--tasks swap_red_blue black_and_white] [--photo coffee]

The quality tables average over six held-out images at five shapes; this looks at one image at the shapes
between them, phrasing by phrasing (English and Chinese), which is where the toy's demo is uneven.
One CPU thread, seed 0, the toy's steps and CFG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.imaging import pil_to_tensor
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.toy.data import load_photo
from step1x_export.toy.demo import edit_resolution
from step1x_export.toy.tasks import TASK_BY_NAME, TASKS, psnr
from step1x_export.toy.weights import TOY_CFG, TOY_STEPS, WEIGHTS_DIR


def phrasing_rows(pipe: Step1XEditPipeline, photo: Image.Image, level: int, tasks: list[str]) -> list[tuple]:
    """(shape, task, phrasing, own dB, nearest task, its dB, identity dB) for every phrasing of `tasks`."""
    image = edit_resolution(photo, level)
    x = pil_to_tensor(image)
    targets = {t.name: t.target(x) for t in TASKS}
    rows = []
    for name in tasks:
        for text in TASK_BY_NAME[name].instructions:
            out = pil_to_tensor(pipe.edit(image, text, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=level))
            scores = {n: psnr(out, t).item() for n, t in targets.items()}
            nearest = max(scores, key=scores.get)
            rows.append((f"{image.width}x{image.height}", name, text, scores[name], nearest, scores[nearest],
                         psnr(x, targets[name]).item()))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="toy weights folder [the shipped ones]")
    p.add_argument("--levels", type=int, nargs="+", default=[96, 112, 128, 144, 160], help="size levels")
    p.add_argument("--tasks", nargs="+", default=[t.name for t in TASKS if t.name != "no_change"],
                   choices=[t.name for t in TASKS], help="tasks [all but no_change]")
    p.add_argument("--photo", default="coffee",
                   help="a toy.data.load_photo name: scikit-image's, sklearn:NAME, matplotlib:NAME [coffee]")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = Step1XEditPipeline.from_pretrained(args.weights, config=get_config("toy"), dtype=torch.float32)
    pipe.conditioning_cache = None  # the MLLM itself on every phrasing
    photo = Image.fromarray(load_photo(args.photo))
    print("| shape | task | phrasing | dB vs own target | nearest target | its dB | identity dB |")
    print("|---" * 7 + "|")
    summary: dict[tuple[str, str], list[float]] = {}
    misread = 0
    for level in args.levels:
        for shape, task, text, own, nearest, near_db, identity in phrasing_rows(pipe, photo, level, args.tasks):
            misread += nearest != task
            summary.setdefault((shape, task), []).append(own)
            flag = "" if nearest == task else " **misread**"
            print(f"| {shape} | {task} | {text} | {own:.2f} | {nearest}{flag} | {near_db:.2f} | {identity:.2f} |",
                  flush=True)
    print("\nmean over phrasings (dB vs own target):")
    for (shape, task), values in summary.items():
        print(f"  {shape} {task}: {sum(values) / len(values):.2f} (min {min(values):.2f})")
    print(f"misread: {misread} of {sum(len(v) for v in summary.values())} edits")


if __name__ == "__main__":
    main()
