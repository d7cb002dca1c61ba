"""RegionE through 8-bit artifacts, eager and compiled, on tiny (random weights): the final latent's relative
error compiled vs eager and quantized vs fp32, the partition and plan of each, the compiles.

    PYTHONPATH=$PWD python benchmarks/region_quant.py [fp8] [int8-sq]

The artifact is calibrated on one pair (2 steps, size level 32); the edit: 28 steps, size level 64,
`regione:threshold=0,erode=0` (random weights edit everything at the published threshold), one CPU thread.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from step1x_export.calibrate.artifact import save_artifact
from step1x_export.calibrate.collect import collect_stats
from step1x_export.calibrate.dataset import describe, split_pairs
from step1x_export.calibrate.recipes import build_artifact
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

CACHE = "regione:threshold=0,erode=0"


def edit(**load: object) -> tuple[torch.Tensor, dict]:
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    with Step1XEditRuntime.load("tiny", device="cpu", cache=CACHE, **load) as rt:
        rt.edit(image, "add a hat", seed=0, steps=28, size_level=64)
        stats = rt.stats()
        return rt.last_latent.clone(), {"plan": stats.cache, "compiles": stats.compiles}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    torch.set_num_threads(1)
    pipe = Step1XEditPipeline.random("tiny", seed=0)
    pairs = split_pairs()[0][:1]
    stats = collect_stats(pipe, pairs, steps=2, size_level=32, progress=False)
    fp32, _ = edit(compile=False)
    with tempfile.TemporaryDirectory() as folder:
        for recipe in sys.argv[1:] or ["fp8", "int8-sq"]:
            artifact = build_artifact(pipe.model, stats, recipe, calibration=describe(pairs))
            path = save_artifact(artifact, Path(folder) / f"{recipe}.st")
            eager, a = edit(quant=path, compile=False)
            start = time.perf_counter()
            compiled, b = edit(quant=path, compile=True)
            same = a["plan"]["edited"] == b["plan"]["edited"] and a["plan"]["kinds"] == b["plan"]["kinds"]
            print(f"{recipe}: compiled vs eager {rel(compiled, eager):.2e}, quantized vs fp32 {rel(eager, fp32):.2e}, "
                  f"same partition and plan: {same}, {b['compiles']} compiles, {time.perf_counter() - start:.0f} s "
                  f"compiled run", flush=True)


if __name__ == "__main__":
    main()
