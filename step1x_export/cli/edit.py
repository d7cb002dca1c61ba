"""`step1x-export edit` and `step1x-export demo`."""

from __future__ import annotations

from pathlib import Path

import click
from PIL import Image

from ..step1x_ref.configs import CONFIGS
from ..step1x_ref.imaging import load_image
from ..step1x_ref.pipeline import Step1XEditPipeline
from .common import CFG, IMAGE_SUFFIXES, SEED, check_output_path, save_image, step_progress, user_errors
from .runtime_options import RuntimeArgs, runtime_options
from .speedups import cache_fidelity, is_leader, speedup_options

DEMO_INSTRUCTION = "Make the sky behind the astronaut a deep purple"


@click.command()
@runtime_options()
@click.option("--image", "image_path", required=True, type=click.Path(path_type=Path), help="Image to edit.")
@click.option("--prompt", required=True, help='Edit instruction; may be "" (allowed upstream).')
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help=f"Output image ({', '.join(IMAGE_SUFFIXES)}); its folder must exist; written atomically.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed.")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True, help="Denoising steps.")
@click.option("--cfg", type=CFG, default=6.0, show_default=True, help="True-CFG guidance scale (0 = unguided).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution: area ~ size_level^2, aspect kept; the output is resized back to the input's size "
                   "[default: 1024 for the real model (upstream's), 256 for the tiny ones (their largest profile)].")
@click.option("--negative-prompt", default="", show_default=True, help="Instruction of the unconditional branch.")
@click.option("--quiet", is_flag=True, help="No progress bar or timing table.")
@speedup_options
@user_errors
def edit(
    runtime: RuntimeArgs, image_path: Path, prompt: str, out_path: Path, seed: int, steps: int, cfg: float,
    size_level: int | None, negative_prompt: str, quiet: bool, cache: str | None, compare_uncached: bool | None,
    cfg_degree: int, ulysses_degree: int, ring_degree: int,
) -> None:
    """Edit one image with the runtime (torch, ONNX Runtime or TensorRT engines); prints the per-stage times."""
    runtime.check_source()
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    image = load_image(image_path)
    import torch

    from ..runtime import Step1XEditRuntime

    speedups = dict(cache=cache, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree, ring_degree=ring_degree)

    def run(**overrides: object) -> tuple[Image.Image, Step1XEditRuntime, torch.Tensor]:
        rt = Step1XEditRuntime.load(**runtime.load_kwargs(), **{**speedups, **overrides})
        with rt, step_progress(enabled=not quiet and is_leader()) as progress:
            result = rt.edit(image, prompt, seed=seed, steps=steps, cfg=cfg, size_level=size_level,
                             negative_prompt=negative_prompt, progress=progress)
            latent = rt.last_latent  # closing the runtime drops it
        return result, rt, latent

    result, rt, latent = run()
    lines = [f"note: {note}" for note in rt.notes]
    lines += [rt.timer.table(), f"peak memory: {rt.peak_memory}", f"runtime: {rt.stats().summary()}"]
    if rt.cache_stats is not None:
        lines.append(f"step cache {rt.options.cache}: {rt.cache_stats}")
        tiny = runtime.load_kwargs()["source"] in ("tiny", "tiny-v1.0")
        if compare_uncached if compare_uncached is not None else tiny:
            uncached, _, plain_latent = run(cache=None)
            lines.append(cache_fidelity(latent, result, plain_latent, uncached))
    if not is_leader():  # every rank computed the same image; rank 0 writes and reports it
        return
    save_image(result, out_path)
    if not quiet:
        click.echo("\n".join(lines))
    layout = rt.options.parallel
    click.echo(f"wrote {out_path} ({result.width}x{result.height}; backend {runtime.backend}"
               f"{'; ' + str(layout) if layout.world > 1 else ''})")


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
