"""`step1x-export build`: an ONNX export folder -> TensorRT engines (+ engines.json) for this GPU."""

from __future__ import annotations

from pathlib import Path

import click

from ..precision import Precision
from .common import FiniteFloat, user_errors

COMPONENTS = ("dit", "vae_encoder", "vae_decoder")


@click.command()
@click.option("--onnx-dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Export folder written by `step1x-export export` (manifest.json + ONNX graphs).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the engines (<component>.plan) and engines.json; created if missing.")
@click.option("--components", default=",".join(COMPONENTS), show_default=True,
              help="Comma-separated components of the export to build.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level: higher tries more tactics (slower build, maybe faster run).")
@click.option("--timing-cache", type=click.Path(path_type=Path, dir_okay=False),
              help="Timing cache file: read if present and written back, so rebuilds on this GPU are fast.")
@click.option("--strongly-typed/--weakly-typed", default=True, show_default=True,
              help="Strongly typed: every tensor keeps the ONNX graph's type (required for FP8/INT8 Q/DQ graphs). "
                   "Weakly typed: TensorRT may pick kernels in the graph's precision (bf16/fp16 flag).")
@click.option("--workspace-gib", type=FiniteFloat(0.1, 1e4), default=None,
              help="Cap TensorRT's scratch memory [default: TensorRT's own].")
@click.option("--refittable", is_flag=True,
              help="Build with TensorRT's REFIT flag, so new weights (e.g. a merged LoRA) can be set into the "
                   "engine by initializer name without a rebuild (float engines; quantized layers are rebuilt).")
@user_errors
def build(onnx_dir: Path, out_dir: Path, components: str, opt_level: int, timing_cache: Path | None,
          strongly_typed: bool, workspace_gib: float | None, refittable: bool) -> None:
    """Build TensorRT engines from an ONNX export, one optimization profile per component from the
    export's min/opt/max shapes. The engines run only on this GPU model with this TensorRT version
    (both recorded in engines.json and checked at load). Needs the `tensorrt` extra and a CUDA GPU.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        raise click.ClickException("TensorRT is not installed: pip install 'step1x-export[tensorrt]'") from err
    from ..export.manifest import load_manifest
    from ..instructions import read_known_tasks
    from ..runtime.engines.trt_build import BuildInput, BuildOptions, build_all
    from ..sources import save_known_tasks

    manifest = load_manifest(onnx_dir)
    names = [c.strip() for c in components.split(",") if c.strip()]
    entries = [manifest.component(n) for n in names]
    options = BuildOptions(strongly_typed=strongly_typed, opt_level=opt_level, timing_cache=timing_cache,
                           workspace_gib=workspace_gib, refittable=refittable)
    inputs = [BuildInput(e.name, e.path, e.spec, e.dims, Precision.parse(e.precision)) for e in entries]
    result = build_all(manifest.config, inputs, out_dir, options,
                       progress=lambda name: click.echo(f"building {name} (opt level {opt_level}) ...", err=True))
    save_known_tasks(out_dir, read_known_tasks(onnx_dir))  # the export's list of learned instructions, if any
    click.echo(f"wrote {len(result.components)} engine(s) and engines.json to {out_dir} "
               f"for {result.platform_.gpu_name} (sm {result.platform_.compute_capability}, "
               f"TensorRT {result.platform_.tensorrt_version})")
