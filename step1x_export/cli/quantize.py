"""`step1x-export quantize`: stream a DiT checkpoint into a quantized checkpoint the runtime loads directly."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import DTYPES, WEIGHT_ONLY, WEIGHT_ONLY_DEFAULT
from ..step1x_ref.configs import CONFIGS
from .common import check_output_path, torch_dtype, user_errors


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder with the official files: its DiT checkpoint of --version is the source (bf16 or the "
                   "v1.0 FP8-stored file, read layer by layer without a bf16 copy of the model).")
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False),
              help="A DiT safetensors file to quantize instead of --model-dir's (e.g. a tiny model's).")
@click.option("--version", type=click.Choice(list(CONFIGS)), default="v1.1", show_default=True,
              help="Model config of the checkpoint.")
@click.option("--artifact", type=click.Path(path_type=Path, dir_okay=False),
              help="Calibration artifact (`step1x-export calibrate`): its layers become W8A8 with its scales.")
@click.option("--weight-only", type=click.Choice(WEIGHT_ONLY), default="int8", show_default=True,
              help="The modulation and connector Linears (not in the artifact) as 8-bit weight-only layers "
                   "(int8 per-channel: the same bytes as fp8, less error).")
@click.option("--weight-only-layers", multiple=True, default=WEIGHT_ONLY_DEFAULT, show_default=True,
              help="Which Linears --weight-only takes (fnmatch patterns over module names; repeatable).")
@click.option("--int4-layers", multiple=True, default=(), show_default=True,
              help="Linears stored in 4 bits (group-wise, bf16 scale and zero: torch's W4A16 format), dequantized "
                   "per layer before the GEMM; fnmatch patterns over module names, repeatable, e.g. "
                   "'double_blocks.*' 'single_blocks.*'. Layers of --artifact or --weight-only-layers keep those.")
@click.option("--int4-group", type=click.Choice(["128", "64", "32"]), default="128", show_default=True,
              help="Input channels per 4-bit scale and zero (a layer whose width 128 does not divide takes 64 or 32).")
@click.option("--int4-clip/--no-int4-clip", default=True, show_default=True,
              help="Per group, shrink the 4-bit range where that lowers the weights' squared error.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="dtype of the layers kept in high precision [default: the artifact's calibration dtype, "
                   "else bf16].")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Quantized checkpoint (.safetensors); its folder must exist; written atomically.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def quantize(model_dir: Path | None, checkpoint: Path | None, version: str, artifact: Path | None,
             weight_only: str, weight_only_layers: tuple[str, ...], int4_layers: tuple[str, ...], int4_group: str,
             int4_clip: bool, dtype: str | None, out_path: Path, quiet: bool) -> None:
    """Write a quantized checkpoint: the DiT with 8-bit (and 4-bit) weights, scales and smoothing factors, the other
    layers as they are, keyed by module name. Host memory stays near one layer plus the output being
    written. Use it with `edit --quant FILE` (the runtime assigns its tensors straight to the device).
    """
    if (model_dir is None) == (checkpoint is None):
        raise click.UsageError("give exactly one of --model-dir DIR or --checkpoint FILE")
    if artifact is None and weight_only == "none" and not int4_layers:
        raise click.UsageError("nothing to quantize: give --artifact, --weight-only fp8|int8 and/or --int4-layers")
    check_output_path(out_path)
    from ..calibrate.artifact import load_artifact
    from ..calibrate.qcheckpoint import write_quantized_checkpoint
    from ..calibrate.weight_only import WEIGHT_ONLY_FORMATS
    from ..step1x_ref.weights.loading import ModelFiles

    source = checkpoint if checkpoint is not None else ModelFiles.in_dir(model_dir, version).dit
    info = write_quantized_checkpoint(
        source, version, out_path, artifact=load_artifact(artifact) if artifact else None,
        weight_only=weight_only_layers if weight_only != "none" else (),
        weight_only_format=WEIGHT_ONLY_FORMATS[weight_only], int4=int4_layers, int4_group=int(int4_group),
        int4_clip=int4_clip,
        dtype=torch_dtype(dtype) if dtype else None, progress=not quiet,
    )
    size = out_path.stat().st_size
    click.echo(f"wrote {out_path} ({size / 2**30:.2f} GiB): {info.summary()}")
