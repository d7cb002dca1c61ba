"""What the demo shows beside an edit: the input next to the output, and the edit's score."""

from __future__ import annotations

from PIL import Image

from ..step1x_ref.imaging import edit_size, pil_to_tensor
from .tasks import psnr, task_for


def edit_resolution(image: Image.Image, size_level: int) -> Image.Image:
    """The image at the size the pipeline edits it at (so its own resize is the identity)."""
    return image.resize(edit_size(*image.size, size_level), Image.Resampling.BICUBIC)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8, min_height: int = 256) -> Image.Image:
    """`left | right` on a white background, both enlarged (nearest neighbour: every pixel shown as it is)."""
    zoom = max(1, -(-min_height // left.height))
    left, right = (im.convert("RGB").resize((left.width * zoom, left.height * zoom), Image.Resampling.NEAREST)
                   for im in (left, right))
    canvas = Image.new("RGB", (left.width * 2 + gap, left.height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def task_report(image: Image.Image, result: Image.Image, instruction: str) -> str | None:
    """PSNR of the edit and of the unchanged input against the instruction's exact target; None for an
    instruction that is not one of the toy tasks' phrasings."""
    task = task_for(instruction)
    if task is None:
        return None
    x = pil_to_tensor(image)
    target = task.target(x)
    model, identity = psnr(pil_to_tensor(result), target).item(), psnr(x, target).item()
    return (f"task {task.name}: PSNR vs the exact target {model:.2f} dB; returning the input unchanged: "
            f"{identity:.2f} dB")
