"""The toy model's quality tables: task PSNR against the exact targets on the held-out images (photos and
graphics), one table per evaluated shape, for the fp32 reference, ONNX Runtime (at the shapes the exported
graphs' profile takes: the toy's, size levels 64 to 160), FP8 and INT8-SmoothQuant (calibrated here on the
toy model), 4-bit block weights (nearest rounding, and GPTQ calibrated here), step caching (TeaCache, with the
share of DiT calls it reused), next to the identity baseline and the autoencoder's ceiling.

    python -m step1x_export.toy.quality [--shapes 64x64 96x64 ...] [--views 1] [--calib-samples 42]
        [--calib-steps 28] [--teacache 0.2 0.4] [--columns "INT4 blocks (GPTQ)" ...]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from ..export.manifest import ExportError
from ..step1x_ref.pipeline import Step1XEditPipeline
from . import small_pipeline
from .data import EVAL_SHAPES, size_level_for
from .evaluate import EditFn, TaskScore, format_scores, level_of, pipeline_edit, roundtrip, shape_scores, to_pil
from .tasks import task_for
from .weights import TOY_CFG, TOY_SIZE, TOY_STEPS

Shape = tuple[int, int]

RECIPES = {"FP8 (W8A8 E4M3)": "fp8", "INT8 (SmoothQuant W8A8)": "int8-sq"}
INT4_LAYERS = ("double_blocks.*", "single_blocks.*")  # every block Linear; the modulation ones stay int8 weight-only
ALWAYS = ("fp32 (torch)", "autoencoder ceiling")  # scored whichever columns are asked for
DOUBLE_BLOCKS = ("double_blocks.*",)
INT4_COLUMNS = {"INT4 blocks (nearest)": (INT4_LAYERS, False), "INT4 blocks (GPTQ)": (INT4_LAYERS, True),
                "INT4 double blocks (GPTQ), single int8": (DOUBLE_BLOCKS, True)}


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
    return lambda image, text: runtime.edit(image, text, seed=0, steps=TOY_STEPS, cfg=TOY_CFG,
                                            size_level=level_of(image))


def cached_edit(pipe: Step1XEditPipeline, threshold: float, reused: list[float]) -> EditFn:
    """The torch runtime over the same modules with TeaCache at `threshold`; appends each edit's reused share."""
    from ..runtime import RuntimeOptions, Step1XEditRuntime

    options = RuntimeOptions(precision="fp32", cuda_graphs=False, compile=False, cache=f"teacache:{threshold}")
    runtime = Step1XEditRuntime.from_pipeline(pipe, options)

    def edit(image, text):
        out = runtime.edit(image, text, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=level_of(image))
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


def int4_pipeline(pipe: Step1XEditPipeline, samples: int, steps: int, gptq: bool,
                  layers: tuple[str, ...] = INT4_LAYERS) -> Step1XEditPipeline:
    """The DiT as a 4-bit checkpoint holds it (`quantize --int4-layers LAYERS`): the block Linears matching
    `layers` in 4 bits, the modulation and any other block Linear int8 weight-only; `gptq`: the 4-bit codes by
    GPTQ over H from the toy's calibration pairs, else nearest rounding."""
    from ..calibrate.formats import QuantFormat
    from ..calibrate.hessians import collect_hessians
    from ..calibrate.int4 import quantize_int4_
    from ..calibrate.recipes import select_layers
    from ..calibrate.weight_only import quantize_weights_
    from ..choices import MODULATION
    from .calibration import calibration_pairs

    linears = [n for n, m in pipe.model.named_modules() if isinstance(m, torch.nn.Linear)]
    four = select_layers(linears, layers, MODULATION)
    eight = [n for n in select_layers(linears, INT4_LAYERS, ()) if n not in four]
    hessians = collect_hessians(pipe, calibration_pairs()[:samples], four, steps=steps, size_level=TOY_SIZE,
                                cfg=TOY_CFG) if gptq else None
    model = quantize_weights_(copy.deepcopy(pipe.model), eight, QuantFormat.INT8)
    model = quantize_int4_(model, four, clip_search=True, hessians=hessians)
    return Step1XEditPipeline(pipe.config, model, pipe.ae, pipe.embedder, device=pipe.device, dtype=pipe.dtype)


def quality_tables(shapes: tuple[Shape, ...], views: int, calib_samples: int, calib_steps: int,
                   teacache: tuple[float, ...] = (), log=print, columns: tuple[str, ...] | None = None,
                   ) -> dict[Shape, dict[str, list[TaskScore]]]:
    """Per shape, one column of task scores per backend. Each backend is built once (the ONNX export has
    dynamic shapes, the quantized DiTs are calibrated once at the default size level) and run at every shape."""
    torch.set_num_threads(1)
    pipe = small_pipeline("toy")
    start = time.perf_counter()
    tables: dict[Shape, dict[str, list[TaskScore]]] = {shape: {} for shape in shapes}

    def wanted(label: str) -> bool:
        return columns is None or label in columns or label in ALWAYS

    def score(label: str, edit: EditFn) -> None:
        for shape in shapes:
            try:
                tables[shape][label] = shape_scores(edit, shape, views_per_image=views)
            except ExportError as e:  # an exported graph takes only the toy profile's sizes
                log(f"{label} at {shape[0]}x{shape[1]}: not scored ({e})")
                continue
            log(f"{label} at {shape[0]}x{shape[1]} done at {time.perf_counter() - start:.0f} s: "
                + ", ".join(f"{s.task} {s.model_db:.2f}" for s in tables[shape][label]))

    score("fp32 (torch)", pipeline_edit(pipe))
    score("autoencoder ceiling", ceiling_edit(pipe))
    with tempfile.TemporaryDirectory() as tmp:
        if wanted("ONNX Runtime"):
            score("ONNX Runtime", onnxruntime_edit(pipe, Path(tmp)))
    for label, recipe in RECIPES.items():
        if wanted(label):
            score(label, pipeline_edit(quantized_pipeline(pipe, recipe, calib_samples, calib_steps)))
    for label, (layers, gptq) in INT4_COLUMNS.items():
        if wanted(label):
            score(label, pipeline_edit(int4_pipeline(pipe, calib_samples, calib_steps, gptq, layers)))
    for threshold in teacache:
        reused: list[float] = []
        for shape in shapes:
            reused.clear()
            scores = shape_scores(cached_edit(pipe, threshold, reused), shape, views_per_image=views)
            tables[shape][f"TeaCache {threshold:g} ({100 * sum(reused) / len(reused):.0f}% reused)"] = scores
            log(f"TeaCache {threshold:g} at {shape[0]}x{shape[1]} done at {time.perf_counter() - start:.0f} s: "
                + ", ".join(f"{s.task} {s.model_db:.2f}" for s in scores))
    return tables


def parse_shape(text: str) -> Shape:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is WIDTHxHEIGHT (e.g. 96x64), got {text!r}") from None
    if w % 16 or h % 16 or min(w, h) < 16:
        raise argparse.ArgumentTypeError(f"a shape's sides are multiples of 16 (>= 16), got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m step1x_export.toy.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=list(EVAL_SHAPES),
                        help="edit sizes WIDTHxHEIGHT to score at [default: "
                             + " ".join(f"{w}x{h}" for w, h in EVAL_SHAPES) + "]")
    parser.add_argument("--views", type=int, default=1,
                        help="views per held-out image (3 photos, 3 graphics) and shape: 1 is the centre crop")
    parser.add_argument("--calib-samples", type=int, default=42, help="calibration pairs (toy instructions)")
    parser.add_argument("--calib-steps", type=int, default=TOY_STEPS, help="denoising steps per calibration pair")
    parser.add_argument("--teacache", type=float, nargs="*", default=[0.2, 0.4],
                        help="TeaCache thresholds to score (upstream's default is 0.2; none: --teacache)")
    parser.add_argument("--columns", nargs="+", default=None,
                        help="score only these columns (besides fp32), e.g. 'INT4 blocks (GPTQ)' [default: all]")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tables = quality_tables(tuple(args.shapes), args.views, args.calib_samples, args.calib_steps,
                            tuple(args.teacache), columns=tuple(args.columns) if args.columns else None)
    for (w, h), columns in tables.items():
        print(f"\n{w}x{h} (size level {size_level_for(w, h)}): task PSNR (dB) vs the exact target, mean over "
              f"{6 * args.views} held-out views, {TOY_STEPS} steps, cfg {TOY_CFG}, seed 0:")
        print(format_scores(columns))
    print(f"took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
