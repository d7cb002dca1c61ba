"""Image I/O and the size_level resize rule, with clear errors on bad input."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..validate import MAX_PIXELS

# The input resize filters a config may name (ModelConfig.input_resample)
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
MIN_SIDE = 16


class ImageInputError(ValueError):
    """The input image cannot be edited (missing, corrupt, too small or too large)."""


def to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """RGB view of any PIL image; converting a mode that loses information says so."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit: PIL's own convert("RGB") clips at 255, so scale to 8 bits first.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(arr / peak * 255), 0, 255).astype(np.uint8)).convert("RGB")
        warnings.warn(f"{source}: 16-bit image converted to 8-bit RGB", stacklevel=2)
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        warnings.warn(f"{source}: alpha channel dropped (mode {image.mode} -> RGB)", stacklevel=2)
    elif image.mode not in ("P", "L", "CMYK", "YCbCr"):
        warnings.warn(f"{source}: mode {image.mode} converted to RGB", stacklevel=2)
    return image.convert("RGB")


class ImageTooLargeError(ImageInputError):
    """The input image has more pixels than the limit (the server answers 413)."""


def check_size(image: Image.Image, source: str = "image", max_pixels: int = MAX_PIXELS) -> None:
    """The one rule on an input picture's size, for the command line, the API and the server."""
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise ImageInputError(f"{source} is {w}x{h}: both sides must be at least {MIN_SIDE} px")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{source} is {w}x{h} ({w * h / 1e6:.1f} MP); the limit is {max_pixels / 1e6:.1f} "
                                 "MP: scale it down first (the edit runs at about size_level^2 pixels and is "
                                 "resized back to the input's size)")


def load_image(path: str | Path) -> Image.Image:
    """Open, validate and convert an image file to RGB; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ImageInputError(f"input image {path} is a directory; give an image file")
    if not path.is_file():
        raise ImageInputError(f"input image {path} does not exist")
    try:
        with Image.open(path) as im:
            check_size(im, str(path))  # from the header, before decoding a possibly huge file
            im.load()
            image = im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"cannot read image {path}: {e}") from e
    return to_rgb(image, str(path))


def edit_size(width: int, height: int, size_level: int) -> tuple[int, int]:
    """Keep the aspect ratio, area ~ size_level**2, both sides floored to multiples of 16 (upstream rule)."""
    if size_level < 16:
        raise ValueError(f"size_level must be >= 16, got {size_level}")
    r = width / height
    if width > height:
        w_new = math.ceil(math.sqrt(size_level * size_level * r))
        h_new = math.ceil(w_new / r)
    else:
        h_new = math.ceil(math.sqrt(size_level * size_level / r))
        w_new = math.ceil(h_new * r)
    w_new, h_new = w_new // 16 * 16, h_new // 16 * 16
    if min(w_new, h_new) < 16:
        raise ImageInputError(f"a {width}x{height} image at size_level {size_level} leaves a side under 16 px")
    return w_new, h_new


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float32 in [0, 1] (torchvision to_tensor semantics)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> PIL, truncating like torchvision's to_pil_image (mul(255).byte())."""
    arr = x.detach().float().cpu().mul(255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
