"""Training and held-out images for the toy model: photographs that ship inside installed packages, and
pictures the training script draws itself (`drawn`), cropped at every shape of the toy's profile.

The photos are scikit-image's bundled photographs (a dependency of this package) plus scikit-learn's two
sample images and matplotlib's portrait of Grace Hopper (the `train` extra), so the data, and the trained
weights, are the same on every machine. Most of scikit-image's photos are grey: without the three colour
photos the autoencoder learns to drop colour it rarely sees (measured: held-out photos decoded grey). The
held-out images, three photos and three graphics (logos, a colour wheel), are never seen in training: not by
the autoencoder, not by the DiT, not as the MLLM's image.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .drawn import drawn_picture

# Real photographs (colour and grey) bundled with scikit-image. Its synthetic images (colour wheel, logo,
# binary blobs, phantoms) are left out: the held-out graphics come from them, and the drawn pictures
# stand in for graphics in training.
TRAIN_PHOTOS = (
    "chelsea", "motorcycle_left", "motorcycle_right", "retina", "immunohistochemistry", "hubble_deep_field",
    "camera", "coins", "brick", "grass", "gravel", "moon", "page", "text", "cell", "clock",
    "sklearn:china", "sklearn:flower", "matplotlib:grace_hopper",
)
HELDOUT_PHOTOS = ("astronaut", "coffee", "rocket")
# Graphics, not photos: flat colours, sharp edges, lettering; the wide matplotlib logo is 4:1.
HELDOUT_GRAPHICS = ("logo", "colorwheel", "matplotlib:logo2.png")
HELDOUT = HELDOUT_PHOTOS + HELDOUT_GRAPHICS
# The shapes the held-out tables are measured at (width, height): squares at size levels 64 and 128,
# 3:2 both ways, and 3:2 beyond level 128.
EVAL_SHAPES = ((64, 64), (96, 64), (64, 96), (128, 128), (192, 128))


def load_photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 RGB [H, W, 3] (grey photos repeated over the three channels).

    `name` is a scikit-image `data` function, or "sklearn:NAME" / "matplotlib:NAME" for those packages' images
    (matplotlib's: a .jpg unless NAME has an extension).
    """
    from skimage import data as skimage_data

    if ":" in name:
        arr = _other_package_photo(*name.split(":", 1))
    elif name.startswith("motorcycle"):
        left, right, _ = skimage_data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        arr = getattr(skimage_data, name)()
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:  # a logo with transparency: shown over white, as a viewer shows it
        alpha = arr[..., 3:].astype(np.float32) / 255
        arr = (arr[..., :3] * alpha + 255 * (1 - alpha)).round()
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _other_package_photo(package: str, name: str) -> np.ndarray:
    try:
        if package == "sklearn":
            from sklearn.datasets import load_sample_image

            return load_sample_image(f"{name}.jpg")
        if package == "matplotlib":
            from matplotlib import cbook
            from PIL import Image

            with cbook.get_sample_data(name if "." in name else f"{name}.jpg") as f:
                return np.asarray(Image.open(f).convert("RGBA"))
    except ImportError as e:
        raise ImportError(f"the toy model's training photo {package}:{name} needs {e.name}: "
                          "pip install 'step1x-export[train]'") from e
    raise ValueError(f"unknown photo source {package!r} in {package}:{name}; known: sklearn, matplotlib")


@functools.lru_cache(maxsize=None)  # each shape's evaluation reads the same images; callers copy
def _cached_photo(name: str) -> np.ndarray:
    return load_photo(name)


def photo_tensors(names: tuple[str, ...], max_short_side: int | None = None) -> list[Tensor]:
    """Photos as float [3, H, W] in [0, 1], optionally downscaled so the short side is <= max_short_side
    (training crops are small: cropping from a smaller copy is much cheaper and loses nothing)."""
    photos = [torch.from_numpy(_cached_photo(n)).permute(2, 0, 1).float().div(255) for n in names]
    if max_short_side is None:
        return photos
    return [_shrink(p, max_short_side) for p in photos]


def _shrink(photo: Tensor, max_short_side: int) -> Tensor:
    _, h, w = photo.shape
    scale = max_short_side / min(h, w)
    if scale >= 1:
        return photo
    size = (round(h * scale), round(w * scale))
    return F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def quantize(x: Tensor) -> Tensor:
    """Round to 8-bit levels, as a photo read from a PNG is: targets are computed from what the model sees."""
    return x.clamp(0, 1).mul(255).round().div(255)


def random_crop(photo: Tensor, width: int, height: int, gen: torch.Generator, min_scale: float = 0.2) -> Tensor:
    """A crop of the photo's aspect-limited largest width:height box scaled by [min_scale, 1], at a random place,
    resized to [3, height, width]."""
    _, h, w = photo.shape
    fit = min(w / width, h / height)  # the largest box of the asked aspect that fits
    scale = min_scale + (1 - min_scale) * float(torch.rand((), generator=gen))
    cw = min(w, max(width // 2, round(width * fit * scale)))
    ch = min(h, max(height // 2, round(height * fit * scale)))
    top = int(torch.randint(0, h - ch + 1, (), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (), generator=gen))
    crop = photo[None, :, top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def colour_jitter(x: Tensor, gen: torch.Generator) -> Tensor:
    """Channel permutation (half the time), per-channel gains, brightness, contrast and saturation."""
    if float(torch.rand((), generator=gen)) < 0.5:
        x = x[torch.randperm(3, generator=gen)]
    u = torch.rand(6, generator=gen)
    x = x * (0.75 + 0.5 * u[:3, None, None])  # per-channel gain: tints grey photos
    grey = x.mean(0, keepdim=True)
    x = grey + (x - grey) * (0.5 + u[3])  # saturation
    mean = x.mean()
    x = mean + (x - mean) * (0.7 + 0.6 * u[4])  # contrast
    return x + (u[5] - 0.5) * 0.3  # brightness


def training_image(photos: list[Tensor], width: int, height: int, gen: torch.Generator,
                   drawn_share: float) -> Tensor:
    """One training image [3, height, width] on 8-bit levels: a drawn picture (`drawn_share` of the time) or
    an augmented crop of a photo (crop, random horizontal flip, colour jitter)."""
    if float(torch.rand((), generator=gen)) < drawn_share:
        return quantize(drawn_picture(width, height, gen))
    photo = photos[int(torch.randint(0, len(photos), (), generator=gen))]
    x = random_crop(photo, width, height, gen)
    if float(torch.rand((), generator=gen)) < 0.5:
        x = x.flip(-1)
    return quantize(colour_jitter(x, gen))


def image_batch(photos: list[Tensor], count: int, width: int, height: int, gen: torch.Generator,
                drawn_share: float) -> Tensor:
    """`count` training images [count, 3, height, width]."""
    return torch.stack([training_image(photos, width, height, gen, drawn_share) for _ in range(count)])


def aspect_crop(image: Tensor, width: int, height: int, gen: torch.Generator | None, min_scale: float) -> Tensor:
    """The centre crop of `image` at width:height (gen None), else a seeded random one, resized to the shape."""
    if gen is not None:
        return random_crop(image, width, height, gen, min_scale=min_scale)
    _, h, w = image.shape
    fit = min(w / width, h / height)
    cw, ch = min(w, round(width * fit)), min(h, round(height * fit))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[None, :, top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def heldout_views(width: int, height: int | None = None, per_image: int = 2, seed: int = 1234,
                  names: tuple[str, ...] = HELDOUT) -> tuple[list[str], Tensor]:
    """The evaluation images at width x height (square when height is None): per held-out image its centre
    crop at that aspect and `per_image - 1` seeded crops, 8-bit ([N, 3, height, width]); no colour jitter."""
    height = width if height is None else height
    gen = torch.Generator().manual_seed(seed)
    labels, views = [], []
    for name, image in zip(names, photo_tensors(names), strict=True):
        for k in range(per_image):
            views.append(aspect_crop(image, width, height, gen if k else None, min_scale=0.4))
            labels.append(f"{name}/{'centre' if k == 0 else f'crop{k}'}")
    return labels, quantize(torch.stack(views))


def size_level_for(width: int, height: int) -> int:
    """A size level at which the edit size rule keeps a width x height image (multiples of 16) as it is."""
    from ..step1x_ref.imaging import edit_size

    base = math.isqrt(width * height)
    for level in (base, base + 1, base - 1, base + 2):
        if edit_size(width, height, level) == (width, height):
            return level
    raise ValueError(f"no size level keeps {width}x{height} unchanged")
