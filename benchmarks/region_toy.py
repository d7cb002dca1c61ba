"""RegionE vs TeaCache vs no cache on the toy: the `denoise` stage's time (runs interleaved), the image tokens
the DiT computed, PSNR against the uncached edit and against the task's exact target.

    PYTHONPATH=$PWD python benchmarks/region_toy.py [--rounds 3] [--shapes 128x128 192x128]
        [--caches none teacache:0.2 teacache:0.4 regione regione:erode=0]

The toy's tasks are all global, but "swap red and blue" leaves grey pixels unchanged: on scikit-image's coffee
photo made grey outside one disc (the cup's region keeps its colour) it is a local edit; the fully coloured
photo with "make it black and white" is a global one. Eager torch on the CPU, one thread, the toy's 28 steps,
seed 0; per cache its own runtime, each round running every cache once in turn (so load drifts alike).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from PIL import Image

from step1x_export.calibrate.evaluate import psnr_db
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.toy.data import load_photo, size_level_for
from step1x_export.toy.demo import task_psnr
from step1x_export.toy.weights import TOY_STEPS

CASES = (("local", "swap red and blue"), ("global", "make it black and white"))


def picture(kind: str, width: int, height: int) -> Image.Image:
    """The coffee photo at width x height; `local`: grey (BT.601 luma) outside a centred disc whose radius is a
    fifth of the short side (about 3 x 3 of the toy's 16-pixel tokens: the least RegionE's erosion keeps)."""
    photo = Image.fromarray(load_photo("coffee")).resize((width, height), Image.Resampling.LANCZOS)
    if kind == "global":
        return photo
    rgb = np.asarray(photo).astype(np.float64)
    grey = np.repeat(np.asarray(photo.convert("L"), dtype=np.float64)[..., None], 3, axis=2)
    yy, xx = np.mgrid[:height, :width]
    disc = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= (min(width, height) / 5) ** 2)[..., None]
    return Image.fromarray(np.where(disc, rgb, grey).round().astype(np.uint8))


def tokens_computed(rt: Step1XEditRuntime) -> float:
    """Image tokens the DiT ran on, as a share of the uncached edit's (every step on noisy + reference)."""
    stats = rt.stats().cache
    if stats is None:
        return 1.0
    if "tokens" in stats:
        return sum(stats["tokens"]) / (2 * stats["image_tokens"] * len(stats["tokens"]))
    return stats["computed"] / (stats["computed"] + stats["reused"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=["128x128", "192x128"])
    parser.add_argument("--caches", nargs="+", default=["none", "teacache:0.2", "teacache:0.4", "regione",
                                                         "regione:erode=0"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    runtimes = {c: Step1XEditRuntime.load("toy", backend="torch", device="cpu", compile=False,
                                          cache=None if c == "none" else c) for c in args.caches}
    print("| picture | task | shape | cache | denoise s (median) | speed-up | tokens computed | PSNR vs uncached "
          "| PSNR vs target (uncached) | tokens edited |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        w, h = (int(v) for v in shape.split("x"))
        for kind, task in CASES:
            image = picture(kind, w, h)
            times: dict[str, list[float]] = {c: [] for c in args.caches}
            results: dict[str, tuple[Image.Image, float, str]] = {}
            for _ in range(args.rounds):
                for cache, rt in runtimes.items():
                    out = rt.edit(image, task, seed=0, steps=TOY_STEPS, size_level=size_level_for(w, h))
                    times[cache].append(rt.timings["denoise"])
                    stats = rt.stats().cache or {}
                    edited = stats.get("edited", {})
                    share = f"{len(next(iter(edited.values())))}/{stats['image_tokens']}" if edited else "-"
                    results[cache] = (out, tokens_computed(rt), share)
            plain = results[args.caches[0]][0]
            base = statistics.median(times[args.caches[0]])
            for cache in args.caches:
                out, computed, share = results[cache]
                scores = task_psnr(image, out, task)
                assert scores is not None
                t = statistics.median(times[cache])
                vs_plain = psnr_db(out, plain)
                print(f"| {kind} | {task} | {shape} | {cache} | {t:.2f} | {base / t:.2f}x | {100 * computed:.0f}% | "
                      f"{'-' if cache == args.caches[0] else f'{vs_plain:.1f} dB'} | {scores[0]:.2f} dB | {share} |",
                      flush=True)
    for rt in runtimes.values():
        rt.close()


if __name__ == "__main__":
    main()
