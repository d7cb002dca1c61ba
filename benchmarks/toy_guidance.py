"""The toy's guidance scale: mean task PSNR per CFG on training photos (where the default is chosen), and, to
report only, on the held-out images and the demo's edit.

    PYTHONPATH=$PWD python benchmarks/toy_guidance.py [--cfgs 1.0 1.25 1.5 1.75 2.0]
        [--shapes 64x64 128x128 192x128] [--heldout] [--model toy | toy-v1.2] [--steps 28] [--weights DIR]

Training photos: the centre crop of each of the 8 colour training photos at each shape, every task and its
phrasings in turn (never the held-out images, so the choice does not fit the figures it is judged by). With
`--heldout`, the same on the six held-out images (as training records them) and the demo's "swap red and blue"
on the coffee photo at the default size level. One CPU thread, the toy's 28 steps, seed 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from step1x_export.sources import PACKAGED
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.toy.data import shape_views, size_level_for
from step1x_export.toy.defaults import DEMO_INSTRUCTION
from step1x_export.toy.demo import demo_photo, edit_resolution, task_psnr
from step1x_export.toy.evaluate import mean_db, scores_on
from step1x_export.toy.weights import TOY_SIZE, TOY_STEPS

COLOUR_TRAINING_PHOTOS = ("chelsea", "motorcycle_left", "retina", "immunohistochemistry", "hubble_deep_field",
                          "sklearn:china", "sklearn:flower", "matplotlib:grace_hopper")


def shape_means(pipe: Step1XEditPipeline, cfg: float, views: dict[tuple[int, int], torch.Tensor],
                steps: int = TOY_STEPS) -> dict[str, float]:
    """Per shape, the mean over the tasks of their mean PSNR over `views`."""
    out = {}
    for (w, h), batch in views.items():
        level = size_level_for(w, h)
        scores = scores_on(lambda im, text, level=level: pipe.edit(im, text, seed=0, steps=steps, cfg=cfg,
                                                                   size_level=level), batch)
        out[f"{w}x{h}"] = mean_db([s.model_db for s in scores])
    return out


def demo_db(pipe: Step1XEditPipeline, cfg: float) -> float:
    image = edit_resolution(demo_photo(trained=True)[1], TOY_SIZE)
    result = pipe.edit(image, DEMO_INSTRUCTION, seed=0, steps=TOY_STEPS, cfg=cfg, size_level=TOY_SIZE)
    return task_psnr(image, result, DEMO_INSTRUCTION)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75, 2.0], help="CFG scales")
    p.add_argument("--shapes", nargs="+", default=["64x64", "128x128", "192x128"], help="WIDTHxHEIGHT")
    p.add_argument("--heldout", action="store_true", help="also the held-out images and the demo (report only)")
    p.add_argument("--model", choices=sorted(PACKAGED), default="toy", help="which trained toy [toy]")
    p.add_argument("--steps", type=int, default=TOY_STEPS, help=f"denoising steps [{TOY_STEPS}]")
    p.add_argument("--weights", type=Path, help="weights folder [the model's shipped ones]")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    pipe = Step1XEditPipeline.from_pretrained(args.weights or PACKAGED[args.model], config=get_config(args.model),
                                              dtype=torch.float32)
    training = {s: shape_views(*s, names=COLOUR_TRAINING_PHOTOS)[1] for s in shapes}
    heldout = {s: shape_views(*s)[1] for s in shapes} if args.heldout else {}
    print("| CFG | " + " | ".join(f"training {w}x{h}" for w, h in shapes) + " | training mean |"
          + (" held-out mean | demo |" if args.heldout else ""))
    print("|---" * (len(shapes) + 2 + (2 if args.heldout else 0)) + "|")
    for cfg in args.cfgs:
        means = shape_means(pipe, cfg, training, args.steps)
        cells = [f"{v:.3f}" for v in means.values()] + [f"{sum(means.values()) / len(means):.3f}"]
        if args.heldout:
            held = shape_means(pipe, cfg, heldout, args.steps)
            cells += [f"{sum(held.values()) / len(held):.3f}", f"{demo_db(pipe, cfg):.2f}"]
        print(f"| {cfg:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
