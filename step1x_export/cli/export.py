"""`step1x-export export`: one ONNX graph per component + manifest.json."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import COMPONENTS
from ..instructions import KNOWN_TASKS_FILE
from ..precision import Precision
from .common import SEED, SMALL_MODELS, lora_option, torch_dtype, user_errors, version_option

GRAPH_PRECISIONS = ("fp32", "fp16", "bf16")


@click.command("export")
@click.option("--model-dir", type=click.Path(path_type=Path), help="Model folder in the official or the "
              "diffusers layout (detected), as for `edit`.")
@click.option("--model", "model_name", type=click.Choice(SMALL_MODELS),
              help="Export a small model instead of --model-dir: toy (trained weights shipped in the package) or "
              "tiny (random weights, testing).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Export folder: {component}.onnx (+ .onnx.data above 2 GB), qwen/ (config, processor), "
                   "tasks.json (the instructions the model learned, where its folder lists them: the toy's), "
                   "manifest.json written last. Refused if not empty, unless --force.")
@click.option("--components", default=None,
              help=f"Comma-separated subset of: {', '.join(COMPONENTS)} [default: all; v1.2: vae_encoder,dit,"
                   "vae_decoder, as its MLLM runs in torch].")
@click.option("--precision", type=click.Choice(GRAPH_PRECISIONS), default="fp32", show_default=True,
              help="Graph precision of vision, llm and dit (the VAE graphs are always fp32, as upstream runs "
                   "them). fp8/int8 graphs come from calibration of an fp32/bf16 export.")
@version_option()
@lora_option('before export (an export carries its LoRAs merged)')
@click.option("--opset", type=click.IntRange(18, 23), default=20, show_default=True,
              help="ONNX opset (TensorRT 10 parses up to 20; Q/DQ for fp8 needs >= 19).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Weight seed of --model tiny.")
@click.option("--quant", "quant_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Calibration artifact (`step1x-export calibrate`): its DiT layers become explicit "
                   "QuantizeLinear/DequantizeLinear pairs in dit.onnx (FP8 E4M3 or INT8). The artifact must come "
                   "from the same weights in the same dtype as --precision (checked by hash).")
@click.option("--force", is_flag=True, help="Overwrite an existing export in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def export(
    model_dir: Path | None, model_name: str | None, out_dir: Path, components: str | None, precision: str,
    version: str | None, lora_specs: tuple[str, ...],
    opset: int, seed: int, quant_path: Path | None, force: bool, quiet: bool,
) -> None:
    """Export Step1X-Edit's components to ONNX (dynamo exporter) with a verified manifest.

    \b
    Example (tiny model, CPU, ~1 min):
      step1x-export export --model tiny --out exports/tiny
      step1x-export export --model tiny --quant fp8.safetensors --out exports/tiny-fp8
      step1x-export edit --backend onnxruntime --engine-dir exports/tiny --image in.png --prompt "..." --out out.png
    """
    from ..calibrate.artifact import load_artifact
    from ..export import export_components
    from ..sources import known_tasks, small_pipeline
    from ..step1x_ref.pipeline import Step1XEditPipeline
    from ..step1x_ref.versions import edit_version
    from ..step1x_ref.weights.lora import LoraSpec, merge_loras

    if (model_dir is None) == (model_name is None):
        raise click.UsageError("give exactly one of --model-dir DIR or --model tiny")
    names = [c.strip() for c in components.split(",") if c.strip()] if components is not None else None
    unknown = [c for c in names if c not in COMPONENTS] if names is not None else []
    if unknown or names == []:
        raise click.BadParameter(f"unknown {unknown or 'empty list'}; choose from {', '.join(COMPONENTS)}",
                                 param_hint="--components")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; pass --force to overwrite the export there")
    quant = load_artifact(quant_path) if quant_path is not None else None
    dtype = torch_dtype(precision)
    loras = [LoraSpec.parse(spec) for spec in lora_specs]
    if model_dir is not None:
        pipe = Step1XEditPipeline.from_pretrained(model_dir, version, device="cpu", dtype=dtype, loras=loras)
    else:
        pipe = small_pipeline(model_name, seed=seed, dtype=dtype)
        merge_loras(pipe.model, loras)
    if names is None:  # every component the model's version exports (v1.2's MLLM runs in torch)
        graphs = edit_version(pipe.config).mllm_graphs
        names = [c for c in COMPONENTS if graphs or c not in ("vision", "llm")]
    known = known_tasks(model_dir if model_dir is not None else model_name)
    manifest = export_components(pipe, out_dir, components=names, precision=Precision.parse(precision),
                                 force=force, progress=not quiet, opset=opset, quant=quant, known_tasks=known)
    for name, entry in manifest.components.items():
        size = sum((out_dir / f).stat().st_size for f in entry.files) / 1e6
        click.echo(f"{name:12s} {entry.file:20s} {entry.precision.value:5s} {size:9.1f} MB "
                   f"{entry.export_seconds:6.1f} s")
    for lora in manifest.loras:
        click.echo(f"merged LoRA {lora['file']} x {lora['multiplier']:g} (sha256 {lora['sha256'][:12]})")
    if known is not None:
        click.echo(f"wrote {out_dir / KNOWN_TASKS_FILE}: the {len(known.tasks)} tasks the {known.model} model learned")
    click.echo(f"wrote {out_dir / 'manifest.json'} (export {manifest.export_id[:12]}, opset {manifest.opset})")
