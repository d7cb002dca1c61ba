"""The toy model's quality table: task PSNR against the exact targets on the held-out photos, for the
fp32 reference, ONNX Runtime, FP8 and INT8-SmoothQuant (calibrated here on the toy model), step caching
(TeaCache, with the share of DiT calls it reused), next to the identity baseline and the autoencoder's ceiling.

    python -m step1x_export.toy.quality [--views 4] [--calib-samples 42] [--calib-steps 28] [--teacache 0.2 0.4]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from ..step1x_ref.pipeline import Step1XEditPipeline
from . import small_pipeline
from .evaluate import EditFn, TaskScore, format_scores, roundtrip, task_scores, to_pil
from .tasks import task_for
from .weights import TOY_CFG, TOY_SIZE, TOY_STEPS

RECIPES = {"FP8 (W8A8 E4M3)": "fp8", "INT8 (SmoothQuant W8A8)": "int8-sq"}


def pipeline_edit(pipe: Step1XEditPipeline, seed: int = 0) -> EditFn:
    return lambda image, text: pipe.edit(image, text, seed=seed, steps=TOY_STEPS, cfg=TOY_CFG, size_level=TOY_SIZE)


def ceiling_edit(pipe: Step1XEditPipeline) -> EditFn:
    """The exact target passed through the autoencoder: what a perfect DiT would give."""
    from ..step1x_ref.imaging import pil_to_tensor

    def edit(image, text):
        return roundtrip(to_pil(task_for(text).target(pil_to_tensor(image))[0]), pipe.ae)

    return edit


def onnxruntime_edit(pipe: Step1XEditPipeline, export_dir: Path) -> EditFn:
    """Export the VAE and the connector + DiT to ONNX, run them in ONNX Runtime (the MLLM stays in torch)."""
    from ..export import export_components
    from ..runtime import Step1XEditRuntime

    export_components(pipe, export_dir, components=("vae_encoder", "dit", "vae_decoder"), progress=False)
    runtime = Step1XEditRuntime.load(export_dir, "onnxruntime", mllm="toy", device="cpu")
    return lambda image, text: runtime.edit(image, text, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=TOY_SIZE)


def cached_edit(pipe: Step1XEditPipeline, threshold: float, reused: list[float]) -> EditFn:
    """The torch runtime over the same modules with TeaCache at `threshold`; appends each edit's reused share."""
    from ..runtime import RuntimeOptions, Step1XEditRuntime

    options = RuntimeOptions(precision="fp32", cuda_graphs=False, compile=False, cache=f"teacache:{threshold}")
    runtime = Step1XEditRuntime.from_pipeline(pipe, options)

    def edit(image, text):
        out = runtime.edit(image, text, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=TOY_SIZE)
        stats = runtime.cache_stats
        reused.append(stats.reused / (stats.computed + stats.reused))
        return out

    return edit


def quantized_pipeline(pipe: Step1XEditPipeline, recipe: str, samples: int, steps: int) -> Step1XEditPipeline:
    """Calibrate `recipe` on the toy model's own instructions over training photos; the same pipeline, DiT swapped."""
    from ..calibrate.apply import quantize_model
    from ..calibrate.collect import collect_stats
    from ..calibrate.recipes import build_artifact
    from .calibration import calibration_pairs

    stats = collect_stats(pipe, calibration_pairs()[:samples], steps=steps, size_level=TOY_SIZE, cfg=TOY_CFG,
                          progress=False)
    artifact = build_artifact(pipe.model, stats, recipe)
    qmodel = quantize_model(copy.deepcopy(pipe.model), artifact)
    return Step1XEditPipeline(pipe.config, qmodel, pipe.ae, pipe.embedder, device=pipe.device, dtype=pipe.dtype)


def quality_table(views: int, calib_samples: int, calib_steps: int, teacache: tuple[float, ...] = (),
                  log=print) -> dict[str, list[TaskScore]]:
    torch.set_num_threads(1)
    pipe = small_pipeline("toy")
    start = time.perf_counter()
    columns = {"fp32 (torch)": task_scores(pipeline_edit(pipe), TOY_SIZE, views_per_photo=views)}
    log(f"fp32 done at {time.perf_counter() - start:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        columns["ONNX Runtime"] = task_scores(onnxruntime_edit(pipe, Path(tmp)), TOY_SIZE, views_per_photo=views)
    log(f"ONNX Runtime done at {time.perf_counter() - start:.0f} s")
    for label, recipe in RECIPES.items():
        qpipe = quantized_pipeline(pipe, recipe, calib_samples, calib_steps)
        columns[label] = task_scores(pipeline_edit(qpipe), TOY_SIZE, views_per_photo=views)
        log(f"{label} done at {time.perf_counter() - start:.0f} s")
    for threshold in teacache:
        reused: list[float] = []
        scores = task_scores(cached_edit(pipe, threshold, reused), TOY_SIZE, views_per_photo=views)
        columns[f"TeaCache {threshold:g} ({100 * sum(reused) / len(reused):.0f}% reused)"] = scores
        log(f"TeaCache {threshold:g} done at {time.perf_counter() - start:.0f} s")
    columns["autoencoder ceiling"] = task_scores(ceiling_edit(pipe), TOY_SIZE, views_per_photo=views)
    return columns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m step1x_export.toy.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=4, help="views per held-out photo (3 photos)")
    parser.add_argument("--calib-samples", type=int, default=42, help="calibration pairs (toy instructions)")
    parser.add_argument("--calib-steps", type=int, default=TOY_STEPS, help="denoising steps per calibration pair")
    parser.add_argument("--teacache", type=float, nargs="*", default=[0.2, 0.4],
                        help="TeaCache thresholds to score (upstream's default is 0.2; none: --teacache)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    columns = quality_table(args.views, args.calib_samples, args.calib_steps, tuple(args.teacache))
    print(f"task PSNR (dB) vs the exact target, mean over {3 * args.views} held-out views at "
          f"{TOY_SIZE}x{TOY_SIZE}, {TOY_STEPS} steps, cfg {TOY_CFG}, seed 0:")
    print(format_scores(columns))
    print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
