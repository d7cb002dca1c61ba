"""`step1x-export edit` and `step1x-export demo`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..instructions import KnownTasks, UnknownInstructionWarning
from ..step1x_ref.configs import get_config
from ..threads import default_threads, torch_threads
from ..toy.defaults import DEMO_INSTRUCTION
from ..validate import MAX_PIXELS
from .common import CFG, IMAGE_SUFFIXES, SEED, SMALL_MODELS, check_output_path, save_image, step_progress, user_errors
from .runtime_options import RuntimeArgs, runtime_options
from .speedups import cache_fidelity, is_leader, speedup_options

if TYPE_CHECKING:
    from PIL import Image

RANDOM_DEMO_INSTRUCTION = "Make the sky behind the astronaut a deep purple"


@click.command()
@runtime_options()
@click.option("--image", "image_path", type=click.Path(path_type=Path),
              help=f"Image to edit (at most {MAX_PIXELS / 1e6:.1f} MP, as the server). Without it: --text-to-image.")
@click.option("--text-to-image", "text_to_image", is_flag=True,
              help="No --image: generate from --prompt alone (upstream's t2i mode) at --width x --height. Refused "
                   "for a model that learned only edits (the toy).")
@click.option("--prompt", required=True, help='Edit instruction; may be "" (allowed upstream). A model that learned '
              "only a few (toy: `step1x-export models` lists them) warns about any other before the edit.")
@click.option("--strict", is_flag=True, help="Refuse an instruction the model did not learn instead of warning.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help=f"Output image ({', '.join(IMAGE_SUFFIXES)}); its folder must exist; written atomically.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Denoising steps [default: the model's: 28; v1.2: 50].")
@click.option("--cfg", type=CFG, default=None,
              help="True-CFG guidance scale (0 = unguided) [default: the model's: 6.0 (upstream's); "
              f"{get_config('toy').default_cfg} for toy (measured best for it)].")
@click.option("--think", is_flag=True, help="v1.2: the MLLM first rewrites the instruction (printed).")
@click.option("--reflect", type=click.IntRange(0, 10), default=0, show_default=True,
              help="v1.2: up to N rounds of edit + the MLLM's judgement (re-edit or restart); the best round is "
                   "written; every generated text is printed.")
@click.option("--judge-retries", type=click.IntRange(1, 100), default=20, show_default=True,
              help="v1.2 --reflect: attempts per judging step when the MLLM's answer does not parse (upstream's 20).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=None,
              help="Edit resolution: area ~ size_level^2, aspect kept; the output is resized back to the input's size "
                   "[default: 1024 for the real model (upstream's), 160 for toy (it trained at 64 to 160: other "
                   "levels are refused), 256 for the tiny ones (their largest profile)].")
@click.option("--negative-prompt", default=None,
              help='Instruction of the unconditional branch [default: "" for an edit; upstream\'s negative prompt '
                   "(worst quality, ...) for text-to-image].")
@click.option("--width", type=click.IntRange(16, 4096), default=None,
              help="Text-to-image width, a multiple of 16 [default: 1024 for the real model (upstream's), 256 for "
                   "the tiny ones]. Only without --image (implies --text-to-image).")
@click.option("--height", type=click.IntRange(16, 4096), default=None,
              help="Text-to-image height, a multiple of 16 [default: as --width]. Only without --image (implies "
                   "--text-to-image).")
@click.option("--quiet", is_flag=True, help="No progress bar or timing table.")
@speedup_options
@user_errors
def edit(
    runtime: RuntimeArgs, image_path: Path | None, text_to_image: bool, prompt: str, strict: bool, out_path: Path,
    seed: int, steps: int | None,
    cfg: float | None, think: bool, reflect: int, judge_retries: int, size_level: int | None,
    negative_prompt: str | None, width: int | None, height: int | None, quiet: bool, cache: str | None,
    compare_uncached: bool | None, cfg_degree: int, ulysses_degree: int, ring_degree: int,
) -> None:
    """Edit one image with the runtime (torch, ONNX Runtime or TensorRT engines); prints the per-stage times.

    With --text-to-image instead of --image, generate an image from --prompt through the same runtime.

    \b
    Example (the toy model, trained here, on scikit-image's coffee photo):
      python -c "from skimage import data; from PIL import Image; Image.fromarray(data.coffee()).save('in.png')"
      step1x-export edit --model toy --image in.png --prompt "make it black and white" --out out.png
    """
    runtime.check_source()
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    check_image_choice(image_path, text_to_image or bool(width or height))
    known = runtime.known_tasks()
    check_text_to_image(known, image_path)
    check_instruction(known, prompt, strict=strict)
    import torch

    from ..step1x_ref.imaging import load_image

    image = load_image(image_path) if image_path is not None else None

    from ..runtime import Step1XEditRuntime

    speedups = dict(cache=cache, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree, ring_degree=ring_degree)
    reasoned = None

    def run(**overrides: object) -> tuple[Image.Image, Step1XEditRuntime, torch.Tensor]:
        nonlocal reasoned
        rt = Step1XEditRuntime.load(**{**runtime.load_kwargs(), **speedups, **overrides})
        with rt, step_progress(enabled=not quiet and is_leader()) as progress:
            t2i_w, t2i_h = (None, None) if image is not None else t2i_size(rt)
            options = {"width": t2i_w, "height": t2i_h, "steps": steps,
                       "cfg": cfg if cfg is not None else rt.config.default_cfg, "size_level": size_level,
                       "negative_prompt": negative_prompt, "progress": progress}
            if think or reflect:
                reasoned = rt.edit_reasoned(image, prompt, think=think, reflect=reflect,
                                            judge_retries=judge_retries, seed=seed, **options)
                result = reasoned.image
            else:
                result = rt.edit(image, prompt, seed=seed, **options)
            latent = rt.last_latent  # closing the runtime drops it
        return result, rt, latent

    def t2i_size(rt: Step1XEditRuntime) -> tuple[int, int]:  # upstream's default: 1024 x 1024
        w = width or height or rt.default_size_level
        return w, height or w

    result, rt, latent = run()
    lines = [f"note: {note}" for note in rt.notes]
    lines += [rt.timer.table(), f"peak memory: {rt.peak_memory}", f"runtime: {rt.stats().summary()}"]
    if rt.cache_stats is not None:
        lines.append(f"step cache {rt.options.cache}: {rt.cache_stats}")
        small = runtime.load_kwargs()["source"] in SMALL_MODELS
        if compare_uncached if compare_uncached is not None else small:
            uncached, _, plain_latent = run(cache=None)
            lines.append(cache_fidelity(latent, result, plain_latent, uncached))
    if not is_leader():  # every rank computed the same image; rank 0 writes and reports it
        return
    save_image(result, out_path)
    if reasoned is not None:
        echo_reasoning(reasoned)
    if not quiet:
        click.echo("\n".join(lines))
    layout = rt.options.parallel
    click.echo(f"wrote {out_path} ({result.width}x{result.height}; backend {runtime.backend}"
               f"{'; ' + str(layout) if layout.world > 1 else ''})")


def check_image_choice(image_path: Path | None, text_to_image: bool) -> None:
    """An edit names its --image; text-to-image is asked for (a forgotten --image is no silent generation)."""
    if image_path is None and not text_to_image:
        raise click.UsageError("give --image FILE to edit a picture, or --text-to-image to make one from --prompt")
    if image_path is not None and text_to_image:
        raise click.UsageError("--width/--height set a text-to-image size (--text-to-image: a picture from --prompt "
                               "alone); an edit keeps its --image's size")


def check_text_to_image(known: KnownTasks | None, image_path: Path | None) -> None:
    """Before any model work: a model that learned only a few edits (the toy) makes no picture from text."""
    if image_path is None and known is not None:
        raise click.UsageError(f"--text-to-image: {known.text_to_image_warning()}; give --image FILE to edit one")


def check_instruction(known: KnownTasks | None, prompt: str, *, strict: bool) -> None:
    """Before any model work: an instruction the model did not learn is a warning (with --strict, an error)."""
    message = known.warning(prompt) if known is not None else None
    if message is None:
        return
    if strict:
        raise click.UsageError(f"--strict: {message}")
    click.echo(f"warning: {message}", err=True)
    warnings.simplefilter("ignore", UnknownInstructionWarning)  # said once; the runtime would say it again


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
              help="Where to write the edited image; the input, the edit and (for a toy task's instruction) "
                   "its exact target side by side go beside it (NAME_side_by_side.png).")
@click.option("--prompt", default=None, help=f"Edit instruction [default: {DEMO_INSTRUCTION!r} for toy (any "
              "phrasing of step1x_export.toy.tasks), "
              f"{RANDOM_DEMO_INSTRUCTION!r} for the random tiny models].")
@click.option("--model", "model_name", type=click.Choice(SMALL_MODELS), default="toy", show_default=True,
              help="toy: the small model trained here (weights shipped in the package); toy-v1.2: the toy "
              "fine-tuned through v1.2's prompt path (shipped too); tiny: random weights.")
@click.option("--steps", type=click.IntRange(1, 1000), default=28, show_default=True, help="Denoising steps.")
@click.option("--cfg", type=CFG, default=None,
              help=f"True-CFG guidance scale [default: {get_config('toy').default_cfg} for toy (measured best for it), "
              "6.0 for tiny].")
@click.option("--size-level", type=click.IntRange(16, 1024), default=None,
              help="Edit resolution [default: the model's: 160 for toy (it trained at 64 to 160, up to 2:1: "
                   "other levels are refused), 256 for tiny].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed (and weight seed of tiny).")
@user_errors
def demo(out_path: Path, prompt: str | None, model_name: str, steps: int, cfg: float | None, size_level: int | None,
         seed: int) -> None:
    """Run a whole edit on an embedded default photo from scikit-image (never seen in training), on CPU.

    With `toy` (default) this is a real edit by a small model trained here, scored against the exact
    target of the instruction's task; with `tiny` the weights are random and the output is noise-like
    (it shows the pipeline runs end to end and where the time goes).
    """
    check_output_path(out_path, suffixes=IMAGE_SUFFIXES)
    from ..sources import PACKAGED, known_tasks, small_pipeline
    from ..specs import profile_for
    from ..toy.demo import demo_photo, edit_resolution, exact_target, side_by_side, task_report

    trained = model_name in PACKAGED
    prompt = prompt if prompt is not None else (DEMO_INSTRUCTION if trained else RANDOM_DEMO_INSTRUCTION)
    pipe = small_pipeline(model_name, seed=seed)
    size_level = size_level or profile_for(pipe.config).max_level
    cfg = cfg if cfg is not None else get_config(model_name).default_cfg
    # The photo is brought to the edit resolution first, so the edit is shown and scored as the model made it.
    photo_name, photo = demo_photo(trained)
    image = edit_resolution(photo, size_level)
    weights = "trained weights" if trained else "RANDOM weights"
    click.echo(f"demo: '{model_name}' model with {weights} on CPU; input: scikit-image {photo_name} at "
               f"{image.width}x{image.height} (size level {size_level}); instruction: {prompt!r}; cfg {cfg}")
    check_instruction(known_tasks(model_name), prompt, strict=False)
    # The small models' ops are tiny: one thread does the toy's 28 steps in 0.46 s of CPU, where two OpenMP
    # threads spin against any other work on the cores (9.5 s of CPU on a busy 2-core machine).
    with torch_threads(default_threads(small_model=True, device_type="cpu")), step_progress() as progress:
        result = pipe.edit(image, prompt, seed=seed, steps=steps, cfg=cfg, size_level=size_level, progress=progress)
    save_image(result, out_path)
    pair_path = out_path.with_name(f"{out_path.stem}_side_by_side{out_path.suffix}")
    target = exact_target(image, prompt) if trained else None
    save_image(side_by_side(image, result, *([target] if target is not None else [])), pair_path)
    click.echo(pipe.timer.table())
    if pipe.conditioning_entry is not None:
        where = ("from the entries shipped with the model (its MLLM's output, checked by the test suite)"
                 if pipe.conditioning_entry.parent == pipe.conditioning_cache.shipped
                 else f"from the cache in {pipe.conditioning_cache.folder}")
        click.echo(f"the MLLM's conditioning of this photo and instruction came {where}; "
                   "STEP1X_EXPORT_CACHE=off runs the MLLM")
    click.echo(f"wrote {out_path} ({result.width}x{result.height}) and {pair_path} "
               f"({'input | edit | exact target' if target is not None else 'input | edit'}, enlarged)")
    if not trained:
        click.echo("weights were random, so this is not a real edit")
    elif (report := task_report(image, result, prompt)) is not None:
        click.echo(report)
