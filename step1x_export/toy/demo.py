"""What the demo shows beside an edit: the input, the output and (for a toy task) the exact target, and the
edit's score."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from ..step1x_ref.imaging import edit_size, pil_to_tensor
from .defaults import DEMO_INSTRUCTION
from .evaluate import to_pil
from .tasks import psnr, task_for


def demo_photo(trained: bool) -> tuple[str, Image.Image]:
    """The demo's input: for a trained model, scikit-image's coffee photo, whole (3:2; held out: never seen in
    training); for random weights, the astronaut, whole."""
    from skimage import data as skimage_data  # real photographs that ship with a dependency

    if not trained:
        return "astronaut", Image.fromarray(skimage_data.astronaut())
    return "coffee", Image.fromarray(skimage_data.coffee())


def edit_resolution(image: Image.Image, size_level: int) -> Image.Image:
    """The image at the size the pipeline edits it at (so its own resize is the identity)."""
    return image.resize(edit_size(*image.size, size_level), Image.Resampling.BICUBIC)


def side_by_side(*images: Image.Image, gap: int = 8, min_height: int = 256) -> Image.Image:
    """`a | b | ...` on a white background, all enlarged (nearest neighbour: every pixel shown as it is)."""
    zoom = max(1, -(-min_height // images[0].height))
    panels = [im.convert("RGB").resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST)
              for im in images]
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    left = 0
    for panel in panels:
        canvas.paste(panel, (left, 0))
        left += panel.width + gap
    return canvas


def exact_target(image: Image.Image, instruction: str) -> Image.Image | None:
    """What the instruction's toy task makes of `image`, exactly; None for any other instruction."""
    task = task_for(instruction)
    if task is None:
        return None
    return to_pil(task.target(pil_to_tensor(image))[0])  # rounded to 8-bit levels, as scored


def task_psnr(image: Image.Image, result: Image.Image, instruction: str) -> tuple[float, float] | None:
    """PSNR (dB) of the edit and of the unchanged input against the instruction's exact target; None for an
    instruction that is not one of the toy tasks' phrasings."""
    task = task_for(instruction)
    if task is None:
        return None
    x = pil_to_tensor(image)
    target = task.target(x)
    return psnr(pil_to_tensor(result), target).item(), psnr(x, target).item()


def task_report(image: Image.Image, result: Image.Image, instruction: str) -> str | None:
    """`task_psnr` in words; None for an instruction that is not one of the toy tasks' phrasings."""
    scores = task_psnr(image, result, instruction)
    if scores is None:
        return None
    model, identity = scores
    return (f"task {task_for(instruction).name}: PSNR vs the exact target {model:.2f} dB; returning the input "
            f"unchanged: {identity:.2f} dB")


def demo_conditioning(pipe, size_level: int) -> list[tuple[list[str], Image.Image, tuple]]:
    """What the demo's edit asks the MLLM (texts, image) and what the pipeline answers, in order."""
    calls = []
    encode = pipe.encode

    def recording(texts: list[str], image: Image.Image):
        outputs = encode(texts, image)
        calls.append((texts, image, outputs))
        return outputs

    pipe.encode = recording
    try:
        image = edit_resolution(demo_photo(trained=True)[1], size_level)
        pipe.prepare(image, DEMO_INSTRUCTION, seed=0, steps=1, size_level=size_level)
    finally:
        del pipe.encode  # the class's method again
    return calls


def ship_demo_conditioning(weights_dir: Path, size_level: int) -> list[Path]:
    """Write the toy MLLM's conditioning of the demo's photo and instruction into the weights folder's shipped
    entries (replacing any there), computed by the MLLM now: the demo's first run then skips transformers'
    imports, seconds of a first run whose edit takes half a second."""
    import torch

    from ..step1x_ref.configs import get_config
    from ..step1x_ref.mllm.conditioning_cache import SHIPPED_CONDITIONING_DIR, ConditioningCache
    from ..step1x_ref.pipeline import Step1XEditPipeline
    from ..step1x_ref.weights.loading import ModelFiles

    config = get_config("toy")
    pipe = Step1XEditPipeline.from_pretrained(weights_dir, config=config, dtype=torch.float32)
    pipe.conditioning_cache = None  # the MLLM itself, never an entry
    files = ModelFiles.in_dir(weights_dir, config.version)
    shipped = Path(weights_dir) / SHIPPED_CONDITIONING_DIR
    shutil.rmtree(shipped, ignore_errors=True)
    cache = ConditioningCache(shipped, tuple(files.mllm_folders), config.embedder, torch.float32, "cpu", shipped)
    return [cache.ship(texts, image, outputs) for texts, image, outputs in demo_conditioning(pipe, size_level)]
