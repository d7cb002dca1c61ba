"""`step1x-export calibrate`: collect activation statistics and write a W8A8 quantization artifact."""

from __future__ import annotations

import copy
from pathlib import Path

import click

from ..choices import DEFAULT_EXCLUDE, DTYPES, RECIPES
from ..step1x_ref.configs import get_config
from .common import (
    CFG,
    DEVICE,
    SEED,
    SMALL_MODELS,
    FiniteFloat,
    check_output_path,
    default_device,
    lora_option,
    torch_dtype,
    user_errors,
    version_option,
)


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), help="Model folder in the official or the "
              "diffusers layout (detected), as for `edit`.")
@click.option("--model", "model_name", type=click.Choice(SMALL_MODELS),
              help="Calibrate a small model instead of --model-dir: toy (trained; calibrated on its own tasks' "
              "instructions over the training photos, --eval adds task PSNR) or tiny (random weights, testing).")
@version_option()
@lora_option('before calibration (the artifact is for the merged weights)')
@click.option("--recipe", required=True, type=click.Choice(RECIPES),
              help="fp8: FP8 E4M3 W8A8 (static per-tensor activation scale); int8-sq: INT8 SmoothQuant W8A8.")
@click.option("--alpha", type=FiniteFloat(0.0, 1.0), default=0.5, show_default=True,
              help="SmoothQuant migration strength (int8-sq only).")
@click.option("--weight-scale", "weight_granularity", type=click.Choice(["per-channel", "per-tensor"]),
              default="per-channel", show_default=True, help="Weight scale granularity.")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True,
              help="Calibration (image, instruction) pairs, from the non-held-out split (at most 70).")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True,
              help="Denoising steps per pair (statistics cover every step, both CFG branches).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution of the calibration runs (use the one you deploy at) [default: 1024 for the real "
                   "model, 160 for toy, 256 for the tiny ones].")
@click.option("--cfg", type=CFG, default=None,
              help=f"True-CFG guidance scale [default: 6.0 (upstream's); {get_config('toy').default_cfg} for toy "
              "(what it runs with)].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed of the first pair (pair i: seed+i).")
@click.option("--include", multiple=True, default=("*",), show_default=True,
              help="Layers to quantize: fnmatch pattern over module names ('re:' prefix: regex); repeatable.")
@click.option("--exclude", multiple=True, default=DEFAULT_EXCLUDE, show_default=True,
              help="Layers kept in high precision (pattern, repeatable; giving any replaces the default list).")
@click.option("--eval", "n_eval", type=click.IntRange(0), default=0, show_default=True,
              help="After calibrating, report SQNR per step / image PSNR against the reference on this many "
                   "held-out pairs (holds a second, quantized copy of the DiT beside the reference: plan memory).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Model dtype during calibration [default: bf16 for --model-dir, fp32 for --model]; the "
                   "artifact only applies to a model loaded in this same dtype (its hash is recorded).")
@click.option("--device", type=DEVICE, default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Artifact file (.safetensors: scales + JSON metadata); its folder must exist; written atomically.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def calibrate(
    model_dir: Path | None, model_name: str | None, version: str | None, lora_specs: tuple[str, ...], recipe: str,
    alpha: float, weight_granularity: str, samples: int, steps: int, size_level: int | None, cfg: float | None,
    seed: int,
    include: tuple[str, ...], exclude: tuple[str, ...], n_eval: int, dtype: str | None, device: str | None,
    out_path: Path, quiet: bool,
) -> None:
    """Calibrate W8A8 scales on real photos x edit instructions and write a quantization artifact.

    Runs the reference pipeline's sampling loop over the calibration set, records every Linear input's
    amax (per channel) and turns it into scales with the chosen recipe. Use the artifact with
    `export --quant FILE` and `edit --quant FILE`.
    """
    if (model_dir is None) == (model_name is None):
        raise click.UsageError("give exactly one of --model-dir DIR or --model tiny")
    check_output_path(out_path)
    from ..calibrate.apply import quantize_model
    from ..calibrate.artifact import save_artifact
    from ..calibrate.collect import collect_stats
    from ..calibrate.dataset import describe, split_pairs
    from ..calibrate.evaluate import evaluate, format_table, summarize
    from ..calibrate.recipes import build_artifact
    from ..hashing import file_identity
    from ..sources import PACKAGED, small_pipeline
    from ..specs import profile_for
    from ..step1x_ref.pipeline import Step1XEditPipeline
    from ..step1x_ref.weights.loading import ModelFiles
    from ..step1x_ref.weights.lora import LoraSpec, merge_loras
    from ..toy.calibration import calibration_pairs, task_psnr
    from ..toy.evaluate import format_scores

    calib, held_out = split_pairs()
    loras = [LoraSpec.parse(spec) for spec in lora_specs]
    if model_name in PACKAGED:  # its own instructions: the generic ones are not edits it was trained for
        calib = calibration_pairs()
    if samples > len(calib):
        raise ValueError(f"--samples {samples}: the calibration split has {len(calib)} pairs")
    source = None
    if model_dir is not None:
        # The artifact names the checkpoint file by identity (size + sha256, cached beside it): a later load
        # checks that, not a hash of 25 GB of tensors.
        source = file_identity(ModelFiles.in_dir(model_dir, version).dit).as_dict()
        pipe = Step1XEditPipeline.from_pretrained(model_dir, version, device=device or default_device(),
                                                  dtype=torch_dtype(dtype or "bf16"), loras=loras)
    else:
        pipe = small_pipeline(model_name, dtype=torch_dtype(dtype or "fp32"))
        merge_loras(pipe.model, loras)
    size_level = size_level or profile_for(pipe.config).max_level
    cfg = cfg if cfg is not None else pipe.config.default_cfg
    pairs = calib[:samples]
    stats = collect_stats(pipe, pairs, steps=steps, size_level=size_level, cfg=cfg, seed=seed, progress=not quiet)
    calibration = describe(pairs) | {"steps": steps, "size_level": size_level, "cfg": cfg, "seed": seed,
                                     "model": str(model_dir or model_name),
                                     "loras": [f"{spec.path}:{spec.multiplier}" for spec in loras]}
    artifact = build_artifact(pipe.model, stats, recipe, alpha=alpha, include=include, exclude=exclude,
                              per_channel=weight_granularity == "per-channel", calibration=calibration,
                              source=source, model_hash=source and source["sha256"])
    save_artifact(artifact, out_path)
    click.echo(f"wrote {out_path}: {artifact.summary()}")
    if n_eval:
        qmodel = quantize_model(copy.deepcopy(pipe.model), artifact, check_hash=False)
        reports = evaluate(pipe, qmodel, held_out[:n_eval], steps=steps, size_level=size_level, cfg=cfg,
                           seed=seed, progress=not quiet)
        click.echo(format_table({recipe: summarize(reports)}))
        if pipe.config.name in PACKAGED:  # a trained model with exact-target tasks: is the edit still right?
            scores = task_psnr(pipe, qmodel, recipe, steps=steps, size_level=size_level, cfg=cfg, seed=seed)
            click.echo(f"task PSNR vs the exact target on the held-out photos (dB):\n{format_scores(scores)}")
