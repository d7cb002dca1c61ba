"""Run under torchrun: one tiny edit per parallel layout vs the same edit in this process alone.

    torchrun --nproc-per-node 2 tests/parallel_parity.py OUT.json cfg=2 ulysses=2 ring=2 [teacache:0.4@cfg=2]

Each layout argument is `name=degree[,name=degree]` (cfg, ulysses, ring), optionally prefixed by a step
cache and `@`, and by a model and `/` (`tiny-v1.2/cfg=2`: its per-branch calls alone the reference).
Rank 0 writes {layout: {rel_err, max_abs_err, computed, reused}} as JSON.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

STEPS, SIZE = 8, 64


def parse(layout: str) -> tuple[str, str | None, dict[str, int]]:
    model, _, layout = layout.rpartition("/")
    cache, _, degrees = layout.rpartition("@")
    pairs = (item.split("=") for item in degrees.split(","))
    return model or "tiny", cache or None, {f"{name}_degree": int(value) for name, value in pairs}


def edit_latent(pipe: Step1XEditPipeline, options: RuntimeOptions, image: Image.Image) -> tuple[torch.Tensor, object]:
    rt = Step1XEditRuntime.from_pipeline(pipe, options)
    rt.edit(image, "add a red hat", seed=1, steps=STEPS, size_level=SIZE)
    return rt.last_latent, rt.cache_stats


def main(out: str, layouts: list[str]) -> None:
    torch.manual_seed(0)
    pipes = {}
    image = Image.fromarray((np.random.default_rng(0).random((72, 88, 3)) * 255).astype("uint8"))
    results = {}
    for layout in layouts:
        model, cache, degrees = parse(layout)
        if model not in pipes:
            pipes[model] = Step1XEditPipeline.random(model, seed=0, dtype=torch.float32)
        pipe = pipes[model]
        ref, ref_stats = edit_latent(pipe, RuntimeOptions(precision="fp32", cache=cache), image)
        got, stats = edit_latent(pipe, RuntimeOptions(precision="fp32", cache=cache, **degrees), image)
        err = (got.double() - ref.double())
        results[layout] = {
            "rel_err": float(err.norm() / ref.double().norm()), "max_abs_err": float(err.abs().max()),
            "computed": None if stats is None else stats.computed, "reused": None if stats is None else stats.reused,
            "single_process_decisions": None if ref_stats is None else ref_stats.decisions,
            "decisions": None if stats is None else stats.decisions,
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
