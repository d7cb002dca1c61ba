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
@click.option("--image", "image_path", required=True, type=click.Path(path_type=Path), help="Image to edit.")
@click.option("--prompt", required=True, help='Edit instruction; may be "" (allowed upstream).')
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help=f"Output image ({', '.join(IMAGE_SUFFIXES)}); its folder must exist; written atomically.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Denoising steps [default: the model's: 28; v1.2: 50].")
@click.option("--cfg", type=CFG, default=6.0, show_default=True, help="True-CFG guidance scale (0 = unguided).")
@click.option("--think", is_flag=True, help="v1.2: the MLLM first rewrites the instruction (printed).")
@click.option("--reflect", type=click.IntRange(0, 10), default=0, show_default=True,
              help="v1.2: up to N rounds of edit + the MLLM's judgement (re-edit or restart); the best round is "
                   "written; every generated text is printed.")
@click.option("--judge-retries", type=click.IntRange(1, 100), default=20, show_default=True,
              help="v1.2 --reflect: attempts per judging step when the MLLM's answer does not parse (upstream's 20).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution: area ~ size_level^2, aspect kept; the output is resized back to the input's size "
                   "[default: 1024 for the real model (upstream's), 256 for the tiny ones (their largest profile)].")
@click.option("--negative-prompt", default="", show_default=True, help="Instruction of the unconditional branch.")
@click.option("--quiet", is_flag=True, help="No progress bar or timing table.")
@user_errors
def edit(
    runtime: RuntimeArgs, image_path: Path, prompt: str, out_path: Path, seed: int, steps: int | None, cfg: float,
    think: bool, reflect: int, judge_retries: int, size_level: int | None, negative_prompt: str, quiet: bool,
) -> None:
    """Edit one image with the runtime (torch, ONNX Runtime or TensorRT engines); prints the per-stage times."""
    runtime.check_source()
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    image = load_image(image_path)
    rt = runtime.load()
    with rt, step_progress(enabled=not quiet) as progress:
        options = {"steps": steps, "cfg": cfg, "size_level": size_level, "negative_prompt": negative_prompt,
                   "progress": progress}
        if think or reflect:
            reasoned = rt.edit_reasoned(image, prompt, think=think, reflect=reflect, judge_retries=judge_retries,
                                        seed=seed, **options)
            result = reasoned.image
        else:
            reasoned, result = None, rt.edit(image, prompt, seed=seed, **options)
    save_image(result, out_path)
    if reasoned is not None:
        echo_reasoning(reasoned)
    if not quiet:
        for note in rt.notes:
            click.echo(f"note: {note}")
        click.echo(rt.timer.table())
        click.echo(f"peak memory: {rt.peak_memory}")
        click.echo(f"runtime: {rt.stats().summary()}")
    click.echo(f"wrote {out_path} ({result.width}x{result.height}; backend {runtime.backend})")


def echo_reasoning(reasoned) -> None:
    """Every text the MLLM generated, in order, then the rounds' ranks and the chosen one."""
    for role, text in reasoned.texts:
        click.echo(f"[{role}] {text}")
    if reasoned.texts and reasoned.texts[0][0] == "think":
        click.echo(f"instruction after thinking: {reasoned.instruction}")
    for i, j in enumerate(reasoned.judgements):
        click.echo(f"round {i + 1}: score {j.rank:g}{' (chosen)' if i == reasoned.best else ''}")


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
