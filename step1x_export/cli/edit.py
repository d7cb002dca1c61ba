"""`step1x-export edit` and `step1x-export demo`."""

from __future__ import annotations

from pathlib import Path

import click

from ..step1x_ref.configs import CONFIGS
from ..step1x_ref.imaging import load_image
from ..step1x_ref.pipeline import Step1XEditPipeline
from .common import CFG, IMAGE_SUFFIXES, SEED, check_output_path, save_image, step_progress, user_errors
from .runtime_options import RuntimeArgs, runtime_options

DEMO_INSTRUCTION = "Make the sky behind the astronaut a deep purple"


@click.command()
@runtime_options()
@click.option("--image", "image_path", type=click.Path(path_type=Path),
              help="Image to edit. Without it: text-to-image (upstream's t2i mode) at --width x --height.")
@click.option("--prompt", required=True, help='Edit instruction; may be "" (allowed upstream).')
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help=f"Output image ({', '.join(IMAGE_SUFFIXES)}); its folder must exist; written atomically.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed.")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True, help="Denoising steps.")
@click.option("--cfg", type=CFG, default=6.0, show_default=True, help="True-CFG guidance scale (0 = unguided).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution: area ~ size_level^2, aspect kept; the output is resized back to the input's size "
                   "[default: 1024 for the real model (upstream's), 256 for the tiny ones (their largest profile)].")
@click.option("--negative-prompt", default=None,
              help='Instruction of the unconditional branch [default: "" for an edit; upstream\'s negative prompt '
                   "(worst quality, ...) for text-to-image].")
@click.option("--width", type=click.IntRange(16, 4096), default=None,
              help="Text-to-image width, a multiple of 16 [default: 1024 for the real model (upstream's), 256 for "
                   "the tiny ones]. Only without --image.")
@click.option("--height", type=click.IntRange(16, 4096), default=None,
              help="Text-to-image height, a multiple of 16 [default: as --width]. Only without --image.")
@click.option("--quiet", is_flag=True, help="No progress bar or timing table.")
@user_errors
def edit(
    runtime: RuntimeArgs, image_path: Path | None, prompt: str, out_path: Path, seed: int, steps: int, cfg: float,
    size_level: int | None, negative_prompt: str | None, width: int | None, height: int | None, quiet: bool,
) -> None:
    """Edit one image with the runtime (torch, ONNX Runtime or TensorRT engines); prints the per-stage times.

    Without --image, generate an image from --prompt (text-to-image) through the same runtime and engines.
    """
    runtime.check_source()
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    if image_path is not None and (width or height):
        raise click.UsageError("--width/--height set a text-to-image size; an edit keeps its --image's size")
    image = load_image(image_path) if image_path is not None else None
    rt = runtime.load()
    with rt, step_progress(enabled=not quiet) as progress:
        if image is None:  # text-to-image: upstream's default size is 1024 x 1024
            width = width or height or rt.default_size_level
            height = height or width
        result = rt.edit(image, prompt, seed=seed, steps=steps, cfg=cfg, size_level=size_level,
                         negative_prompt=negative_prompt, progress=progress, width=width, height=height)
    save_image(result, out_path)
    if not quiet:
        for note in rt.notes:
            click.echo(f"note: {note}")
        click.echo(rt.timer.table())
        click.echo(f"peak memory: {rt.peak_memory}")
        click.echo(f"runtime: {rt.stats().summary()}")
    click.echo(f"wrote {out_path} ({result.width}x{result.height}; backend {runtime.backend})")


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
