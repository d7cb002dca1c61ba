"""Training and held-out photographs for the toy model, from images that ship inside installed packages.

The photos are scikit-image's bundled photographs (a dependency of this package) plus scikit-learn's two
sample images and matplotlib's portrait of Grace Hopper (the `train` extra), so the data, and the trained
weights, are the same on every machine. Most of scikit-image's photos are grey: without the three colour
photos the autoencoder learns to drop colour it rarely sees (measured: held-out photos decoded grey). The
held-out photos are never seen in training: not by the autoencoder, not by the DiT, not as the MLLM's image.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# Real photographs (colour and grey) bundled with scikit-image. Synthetic images (colour wheel, logo,
# binary blobs, phantoms) are left out: they are not what an edit model is asked to edit.
TRAIN_PHOTOS = (
    "chelsea", "motorcycle_left", "motorcycle_right", "retina", "immunohistochemistry", "hubble_deep_field",
    "camera", "coins", "brick", "grass", "gravel", "moon", "page", "text", "cell", "clock",
    "sklearn:china", "sklearn:flower", "matplotlib:grace_hopper",
)
HELDOUT_PHOTOS = ("astronaut", "coffee", "rocket")
# Graphics, not photos (flat colours, sharp edges, lettering; matplotlib's logo is 4:1), held out as well:
# the per-shape tables score the model on these beside the photos.
HELDOUT_GRAPHICS = ("logo", "colorwheel", "matplotlib:logo2.png")
# The shapes (width, height) the per-shape tables are measured at: squares at size levels 64 and 128, 3:2
# both ways, and 3:2 past level 128.
EVAL_SHAPES = ((64, 64), (96, 64), (64, 96), (128, 128), (192, 128))


def load_photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 RGB [H, W, 3] (grey photos repeated over the three channels).

    `name` is a scikit-image `data` function, or "sklearn:NAME" / "matplotlib:NAME" for those packages' images
    (matplotlib's: a .jpg unless NAME has an extension). A logo with transparency is shown over white.
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
    if arr.shape[2] == 4 and (arr[..., 3] < 255).any():
        alpha = arr[..., 3:].astype(np.float32) / 255
        arr = (arr[..., :3] * alpha + 255 * (1 - alpha)).round()
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def coffee_view(width: int, height: int, *, local: bool = False) -> Image.Image:
    """scikit-image's coffee photo (held out) at width x height; `local`: grey (BT.601 luma, as PIL's "L")
    outside a centred disc whose radius is a fifth of the short side (about 3 x 3 of the toy's 16-pixel tokens:
    the least RegionE's erosion keeps), so "swap red and blue", which leaves grey alone, is a local edit."""
    photo = Image.fromarray(load_photo("coffee")).resize((width, height), Image.Resampling.LANCZOS)
    if not local:
        return photo
    rgb = np.asarray(photo).astype(np.float64)
    grey = np.repeat(np.asarray(photo.convert("L"), dtype=np.float64)[..., None], 3, axis=2)
    yy, xx = np.mgrid[:height, :width]
    disc = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= (min(width, height) / 5) ** 2)[..., None]
    return Image.fromarray(np.where(disc, rgb, grey).round().astype(np.uint8))


def _other_package_photo(package: str, name: str) -> np.ndarray:
    try:
        if package == "sklearn":
            from sklearn.datasets import load_sample_image

            return load_sample_image(f"{name}.jpg")
        if package == "matplotlib":
            from matplotlib import cbook

            with cbook.get_sample_data(name if "." in name else f"{name}.jpg") as f:
                return np.asarray(Image.open(f).convert("RGBA" if name.endswith(".png") else "RGB"))
    except ImportError as e:
        raise ImportError(f"the toy model's training photo {package}:{name} needs {e.name}: "
                          "pip install 'step1x-export[train]'") from e
    raise ValueError(f"unknown photo source {package!r} in {package}:{name}; known: sklearn, matplotlib")


@functools.cache  # every shape's table reads the same images; callers copy them
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


def random_crop(photo: Tensor, size: int, gen: torch.Generator, min_scale: float = 0.2) -> Tensor:
    """A square crop of side in [min_scale, 1] x the short side, at a random place, resized to size x size."""
    _, h, w = photo.shape
    short = min(h, w)
    side = max(size // 2, int(short * (min_scale + (1 - min_scale) * float(torch.rand((), generator=gen)))))
    top = int(torch.randint(0, h - side + 1, (), generator=gen))
    left = int(torch.randint(0, w - side + 1, (), generator=gen))
    crop = photo[None, :, top : top + side, left : left + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


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


def augmented_crop(photo: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Crop, random horizontal flip, colour jitter, 8-bit levels: one training image [3, size, size]."""
    x = random_crop(photo, size, gen)
    if float(torch.rand((), generator=gen)) < 0.5:
        x = x.flip(-1)
    return quantize(colour_jitter(x, gen))


def training_image(photos: list[Tensor], width: int, height: int, gen: torch.Generator, drawn_share: float) -> Tensor:
    """One training image [3, height, width] on 8-bit levels: a picture drawn here (posters, drawings, screens:
    `drawn_share` of them), else an augmented crop of a photo at that aspect (crop, flip, colour jitter)."""
    from .drawn import drawn_picture

    if float(torch.rand((), generator=gen)) < drawn_share:
        return quantize(drawn_picture(width, height, gen))
    x = aspect_crop(photos[int(torch.randint(0, len(photos), (), generator=gen))], width, height, gen, min_scale=0.2)
    if float(torch.rand((), generator=gen)) < 0.5:
        x = x.flip(-1)
    return quantize(colour_jitter(x, gen))


def fade(x: Tensor, saturation: float) -> Tensor:
    """`x` [.., 3, H, W] with its colours kept at `saturation` (0: its luma grey, 1: unchanged), on 8-bit levels:
    a faded photo, already close to its black-and-white target."""
    from .tasks import grayscale

    grey = grayscale(x.reshape(-1, *x.shape[-3:])).reshape(x.shape)
    return quantize(grey + saturation * (x - grey))


def change_some(pool: Tensor, share: float, gen: torch.Generator,
                change: Callable[[Tensor, torch.Generator], Tensor]) -> Tensor:
    """`pool` with `share` of its images (a coin drawn for each, in order) replaced by `change(image, gen)`."""
    out = pool.clone()
    for i in range(pool.shape[0]):
        if float(torch.rand((), generator=gen)) < share:
            out[i] = change(pool[i], gen)
    return out


def fade_some(pool: Tensor, share: float, gen: torch.Generator, most: float = 0.5) -> Tensor:
    """`pool` with `share` of its images faded to a saturation drawn in [0, most]."""
    return change_some(pool, share, gen, lambda x, g: fade(x, most * float(torch.rand((), generator=g))))


# Red things painted into the fine-tune's images: the training photos are almost never strongly red (3% of
# the pixels of a fine-tune pool, most of them one retina photo), so without them "make the red things green"
# is "leave it alone" on nearly every image and the DiT never learns to find red (measured: a 4000-step
# fine-tune stayed at the identity's PSNR). Most blobs are red; the rest orange (the hue of wood and skin) or
# pink, just outside the task's hue band, so it also learns what to leave alone.
RED_BLOB_HUES = ((-8.0, 8.0), (18.0, 40.0), (-40.0, -18.0))
RED_BLOB_HUE_ODDS = (0.7, 0.2, 0.1)


def red_blob(width: int, height: int, gen: torch.Generator) -> Tensor:
    """A soft-edged ellipse's coverage [1, height, width] in [0, 1] at a seeded place, size and angle."""
    u = torch.rand(5, generator=gen).tolist()
    cx, cy = u[0] * width, u[1] * height
    rx, ry = (0.1 + 0.3 * u[2]) * width, (0.1 + 0.3 * u[3]) * height
    angle = math.pi * u[4]
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5 - cy, torch.arange(width) + 0.5 - cx, indexing="ij")
    along, across = xs * math.cos(angle) + ys * math.sin(angle), -xs * math.sin(angle) + ys * math.cos(angle)
    r = ((along / rx) ** 2 + (across / ry) ** 2).sqrt()
    edge = 1.5 / min(rx, ry)  # about a pixel and a half of soft edge
    return ((1 - r) / edge + 0.5).clamp(0, 1)[None]


def paint_red_things(x: Tensor, gen: torch.Generator, most: int = 3) -> Tensor:
    """`x` [3, H, W] with 1 to `most` blobs recoloured near red (hue, saturation drawn; the photo's light and
    shade kept as their brightness), on 8-bit levels."""
    from .tasks import grayscale

    _, h, w = x.shape
    luma = grayscale(x[None])[0, :1]
    for _ in range(1 + int(torch.randint(0, most, (), generator=gen))):
        band = int(torch.multinomial(torch.tensor(RED_BLOB_HUE_ODDS), 1, generator=gen))
        lo, hi = RED_BLOB_HUES[band]
        u = torch.rand(3, generator=gen).tolist()
        hue, saturation = lo + (hi - lo) * u[0], 0.45 + 0.5 * u[1]
        value = (0.15 + 0.4 * u[2]) + 0.6 * luma  # brighter where the photo is: its texture shows through
        low = value * (1 - saturation)
        mid = low + value * saturation * abs(hue) / 60  # HSV: the middle channel moves with the hue
        colour = torch.cat([value, mid, low] if hue >= 0 else [value, low, mid])
        m = red_blob(w, h, gen)
        x = x * (1 - m) + colour.clamp(0, 1) * m
    return quantize(x)


def paint_some(pool: Tensor, share: float, gen: torch.Generator) -> Tensor:
    """`pool` with `share` of its images given red things (`paint_red_things`)."""
    return change_some(pool, share, gen, paint_red_things)


def image_batch(photos: list[Tensor], count: int, width: int, height: int, gen: torch.Generator,
                drawn_share: float) -> Tensor:
    """`count` training images [count, 3, height, width], from one seeded generator."""
    return torch.stack([training_image(photos, width, height, gen, drawn_share) for _ in range(count)])


def heldout_views(size: int, per_photo: int = 4, seed: int = 1234) -> tuple[list[str], Tensor]:
    """The evaluation images: per held-out photo, its centre square and `per_photo - 1` seeded crops,
    each resized to size x size and 8-bit ([N, 3, size, size]); no colour jitter (real photos as they are)."""
    gen = torch.Generator().manual_seed(seed)
    names, views = [], []
    for name, photo in zip(HELDOUT_PHOTOS, photo_tensors(HELDOUT_PHOTOS), strict=True):
        _, h, w = photo.shape
        s = min(h, w)
        centre = photo[None, :, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        views.append(F.interpolate(centre, size=(size, size), mode="bilinear", antialias=True)[0])
        names.append(f"{name}/centre")
        for k in range(per_photo - 1):
            views.append(random_crop(photo, size, gen, min_scale=0.4))
            names.append(f"{name}/crop{k}")
    return names, quantize(torch.stack(views))


def aspect_crop(image: Tensor, width: int, height: int, gen: torch.Generator | None, min_scale: float = 0.4) -> Tensor:
    """A width:height crop of `image` resized to [3, height, width]: the largest centred one (gen None), else one
    of [min_scale, 1] x that size at a seeded random place."""
    _, h, w = image.shape
    scale = 1.0 if gen is None else min_scale + (1 - min_scale) * float(torch.rand((), generator=gen))
    cw = max(1, round(min(w, h * width / height) * scale))
    ch = max(1, round(min(h, w * height / width) * scale))
    if gen is None:
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
    crop = image[None, :, top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def shape_views(width: int, height: int, per_image: int = 1, seed: int = 1234,
                names: tuple[str, ...] = HELDOUT_PHOTOS + HELDOUT_GRAPHICS) -> tuple[list[str], Tensor]:
    """The held-out photos and graphics at width x height: per image its centre crop at that aspect and
    `per_image - 1` seeded crops, on 8-bit levels ([N, 3, height, width]); no colour jitter."""
    gen = torch.Generator().manual_seed(seed)
    labels, views = [], []
    for name, image in zip(names, photo_tensors(names), strict=True):
        for k in range(per_image):
            views.append(aspect_crop(image, width, height, gen if k else None))
            labels.append(f"{name}/{'centre' if k == 0 else f'crop{k}'}")
    return labels, quantize(torch.stack(views))


def size_level_for(width: int, height: int) -> int:
    """A size level at which the edit size rule keeps a width x height image (sides multiples of 16) as it is."""
    from ..step1x_ref.imaging import edit_size

    base = math.isqrt(width * height)
    for level in (base, base + 1, base - 1, base + 2):
        if edit_size(width, height, level) == (width, height):
            return level
    raise ValueError(f"no size level keeps {width}x{height} unchanged")
