"""`step1x-export edit` and `step1x-export demo`."""

from __future__ import annotations

from pathlib import Path

import click

from ..step1x_ref.configs import CONFIGS
from ..step1x_ref.imaging import load_image
from ..step1x_ref.pipeline import Step1XEditPipeline
from .common import (
    CFG,
    DEVICE,
    DTYPES,
    IMAGE_SUFFIXES,
    SEED,
    check_output_path,
    save_image,
    step_progress,
    user_errors,
)

DEMO_INSTRUCTION = "Make the sky behind the astronaut a deep purple"


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), help="Folder with the official files: the DiT "
              "safetensors (v1.0: step1x-edit-i1258[-FP8].safetensors, v1.1: step1x-edit-v1p1-official.safetensors), "
              "vae.safetensors and Qwen2.5-VL-7B-Instruct/. With --engine-dir only its Qwen2.5-VL folder is used.")
@click.option("--model", "model_name", type=click.Choice(["tiny", "tiny-v1.0"]),
              help="Use a tiny random-weight model instead of --model-dir (testing; output is not a real edit). With "
              "--engine-dir, --model/--model-dir only name a torch MLLM to use instead of the export's vision/llm "
              "graphs.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True, help="What runs the VAE and DiT: PyTorch, ONNX Runtime (needs --engine-dir from "
              "`step1x-export export`) or TensorRT (--engine-dir from `step1x-export build`). The MLLM runs in torch.")
@click.option("--engine-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Export folder (onnxruntime) or engine folder (tensorrt).")
@click.option("--quant", "quant_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Calibration artifact (`step1x-export calibrate`) applied to the torch DiT (FP8 / INT8 W8A8).")
@click.option("--image", "image_path", required=True, type=click.Path(path_type=Path), help="Image to edit.")
@click.option("--prompt", required=True, help='Edit instruction; may be "" (allowed upstream).')
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help=f"Output image ({', '.join(IMAGE_SUFFIXES)}); its folder must exist; written atomically.")
@click.option("--version", type=click.Choice(["v1.0", "v1.1"]), default="v1.1", show_default=True,
              help="Model version of the checkpoint in --model-dir.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed.")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True, help="Denoising steps.")
@click.option("--cfg", type=CFG, default=6.0, show_default=True, help="True-CFG guidance scale (0 = unguided).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution: area ~ size_level^2, aspect kept; the output is resized back to the input's size "
                   "[default: 1024 for the real model (upstream's), 256 for the tiny ones (their largest profile)].")
@click.option("--negative-prompt", default="", show_default=True, help="Instruction of the unconditional branch.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="DiT/MLLM dtype [default: bf16 for --model-dir on a GPU, else fp32]; the VAE runs in fp32.")
@click.option("--device", type=DEVICE, default=None, help="torch device: cpu, cuda, cuda:N [default: cuda if "
              "available, else cpu].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Capture the whole denoising step once per shape and replay it (torch and tensorrt backends on "
                   "CUDA; ignored on CPU and for onnxruntime, whose kernels run on ORT's own stream).")
@click.option("--compile/--no-compile", "compile_dit", default=True, show_default=True,
              help="torch.compile each DiT block (torch backend on CUDA only; the first edit pays the compile).")
@click.option("--sequential-load", is_flag=True,
              help="Load one stage at a time and free it after (MLLM freed before the DiT): for GPUs with <= 24 GB.")
@click.option("--quiet", is_flag=True, help="No progress bar or timing table.")
@user_errors
def edit(
    model_dir: Path | None, model_name: str | None, backend: str, engine_dir: Path | None, quant_path: Path | None,
    image_path: Path, prompt: str, out_path: Path, version: str, seed: int, steps: int, cfg: float,
    size_level: int | None,
    negative_prompt: str, dtype: str | None, device: str | None, cuda_graphs: bool, compile_dit: bool,
    sequential_load: bool, quiet: bool,
) -> None:
    """Edit one image with the runtime (torch, ONNX Runtime or TensorRT engines); prints the per-stage times."""
    from ..runtime import Step1XEditRuntime
    from ..step1x_ref.loading import QWEN_DIR

    if model_dir is not None and model_name is not None:
        raise click.UsageError("give --model-dir DIR or --model tiny, not both")
    if backend == "torch" and model_dir is None and model_name is None:
        raise click.UsageError("--backend torch needs --model-dir DIR or --model tiny")
    if backend == "torch" and engine_dir is not None:
        raise click.UsageError("--engine-dir is for --backend onnxruntime or tensorrt")
    if backend != "torch" and engine_dir is None:
        raise click.UsageError(f"--backend {backend} needs --engine-dir")
    if quant_path is not None and backend != "torch":
        raise click.UsageError("--quant applies to --backend torch (exported graphs carry their own quantization)")
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    image = load_image(image_path)
    if backend == "torch":
        source, mllm = model_dir if model_dir is not None else model_name, None
    else:
        source, mllm = engine_dir, model_name if model_dir is None else model_dir / QWEN_DIR
    runtime = Step1XEditRuntime.load(
        source, backend, quant=quant_path, device=device, dtype=DTYPES[dtype] if dtype else None,
        cuda_graphs=cuda_graphs, compile=compile_dit, sequential_load=sequential_load, version=version, mllm=mllm,
    )
    with runtime, step_progress(enabled=not quiet) as progress:
        result = runtime.edit(image, prompt, seed=seed, steps=steps, cfg=cfg, size_level=size_level,
                              negative_prompt=negative_prompt, progress=progress)
    save_image(result, out_path)
    if not quiet:
        for note in runtime.notes:
            click.echo(f"note: {note}")
        click.echo(runtime.timer.table())
        click.echo(f"peak memory: {runtime.peak_memory}")
    click.echo(f"wrote {out_path} ({result.width}x{result.height}; backend {backend})")


@click.command()
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=Path("demo_edit.png"), show_default=True,
              help="Where to write the edited image.")
@click.option("--prompt", default=DEMO_INSTRUCTION, show_default=True, help="Edit instruction.")
@click.option("--model", "model_name", type=click.Choice(sorted(k for k, c in CONFIGS.items() if c.tiny_qwen)),
              default="tiny", show_default=True, help="Which tiny config.")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True, help="Denoising steps.")
@click.option("--size-level", type=click.IntRange(16, 1024), default=256, show_default=True, help="Edit resolution.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise and weight seed.")
@user_errors
def demo(out_path: Path, prompt: str, model_name: str, steps: int, size_level: int, seed: int) -> None:
    """Run a whole edit on an embedded default: the tiny model, CPU, scikit-image's astronaut photo.

    The weights are RANDOM (no checkpoint ships with this package), so the picture is noise-like:
    the demo shows the pipeline runs end to end and where the time goes, not an edit's quality.
    """
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    from PIL import Image
    from skimage import data as skimage_data  # a real photograph that ships with a dependency

    image = Image.fromarray(skimage_data.astronaut())
    click.echo(f"demo: tiny '{model_name}' model with RANDOM weights on CPU; input: scikit-image astronaut "
               f"{image.width}x{image.height}; instruction: {prompt!r}")
    pipe = Step1XEditPipeline.random(model_name, seed=seed)
    with step_progress() as progress:
        result = pipe.edit(image, prompt, seed=seed, steps=steps, size_level=size_level, progress=progress)
    save_image(result, out_path)
    click.echo(pipe.timer.table())
    click.echo(f"wrote {out_path} ({result.width}x{result.height}); weights were random, so this is not a real edit")
