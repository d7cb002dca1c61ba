"""Pictures the training script draws itself: shapes, gradients, patterns and text, like posters, drawings,
logos and screenshots, which the bundled photos do not show. Every choice comes from a seeded torch
generator and is drawn with Pillow (its bundled font for text), so the same seed draws the same picture.
"""

from __future__ import annotations

import math
import string

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Drawn at this multiple of the asked size, then downscaled with antialiasing: smooth edges, as a
# rendered or photographed graphic has.
SUPERSAMPLE = 2
WORDS = ("SALE", "Open", "menu", "Step", "edit", "photo", "2026", "OK", "Cancel", "hello", "café", "TOY",
         "File", "Help", "news", "Poster", "zoom", "+", "42%", "Q&A")


class _Draw:
    """Random draws from a torch generator, as plain Python values."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def integer(self, lo: int, hi: int) -> int:
        """In [lo, hi]."""
        return int(torch.randint(lo, hi + 1, (), generator=self.gen))

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]

    def colour(self) -> tuple[int, int, int]:
        """Saturated, pastel, dark or grey, about equally often: graphics use all of them."""
        kind = self.integer(0, 3)
        rgb = [self.uniform() for _ in range(3)]
        if kind == 0:  # saturated: one channel high, one low
            hi, lo = self.integer(0, 2), self.integer(0, 2)
            rgb[hi], rgb[lo] = 0.85 + 0.15 * rgb[hi], 0.2 * rgb[lo]
        elif kind == 1:
            rgb = [0.6 + 0.4 * v for v in rgb]
        elif kind == 2:
            rgb = [0.35 * v for v in rgb]
        else:
            rgb = [rgb[0]] * 3
        return tuple(int(255 * v) for v in rgb)

    def point(self, w: int, h: int, margin: float = 0.2) -> tuple[int, int]:
        return (int(self.uniform(-margin, 1 + margin) * w), int(self.uniform(-margin, 1 + margin) * h))


def _gradient(w: int, h: int, d: _Draw) -> np.ndarray:
    """A linear or radial blend of two colours [h, w, 3]."""
    a, b = np.array(d.colour(), np.float32), np.array(d.colour(), np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if d.uniform() < 0.6:
        angle = d.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) / w + ys * math.sin(angle) / h
    else:
        cx, cy = d.point(w, h, 0.0)
        t = np.hypot(xs - cx, ys - cy) / max(w, h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return a + (b - a) * t[..., None]


def _pattern(w: int, h: int, d: _Draw) -> np.ndarray:
    """Stripes, a checkerboard or a sine grating of two colours [h, w, 3]."""
    a, b = np.array(d.colour(), np.float32), np.array(d.colour(), np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    period = d.uniform(6, 60) * SUPERSAMPLE
    angle = d.uniform(0, math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)
    kind = d.integer(0, 2)
    if kind == 0:
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == 1:
        v = -xs * math.sin(angle) + ys * math.cos(angle)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    return a + (b - a) * t[..., None]


def _background(w: int, h: int, d: _Draw) -> Image.Image:
    kind = d.integer(0, 3)
    if kind == 0:
        return Image.new("RGB", (w, h), d.colour())
    arr = _gradient(w, h, d) if kind in (1, 2) else _pattern(w, h, d)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _shape(draw: ImageDraw.ImageDraw, w: int, h: int, d: _Draw) -> None:
    kind = d.integer(0, 4)
    fill = d.colour() if d.uniform() < 0.8 else None
    outline = d.colour() if fill is None or d.uniform() < 0.3 else None
    width = d.integer(1, 6) * SUPERSAMPLE
    (x0, y0), (x1, y1) = d.point(w, h), d.point(w, h)
    box = (min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2)
    if kind == 0:
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif kind == 1:
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == 2:
        radius = d.integer(2, 20) * SUPERSAMPLE
        draw.rounded_rectangle(box, radius=radius, fill=fill, outline=outline, width=width)
    elif kind == 3:
        points = [d.point(w, h) for _ in range(d.integer(3, 6))]
        draw.polygon(points, fill=fill, outline=outline, width=width)
    else:
        points = [d.point(w, h) for _ in range(d.integer(2, 4))]
        draw.line(points, fill=d.colour(), width=width * 2)


def _text(draw: ImageDraw.ImageDraw, w: int, h: int, d: _Draw) -> None:
    size = int(d.uniform(0.06, 0.3) * min(w, h)) + 6
    font = ImageFont.load_default(size=size)
    if d.uniform() < 0.5:
        text = " ".join(d.choice(WORDS) for _ in range(d.integer(1, 3)))
    else:
        text = "".join(d.choice(string.ascii_letters + string.digits) for _ in range(d.integer(2, 8)))
    draw.text(d.point(w, h, -0.1), text, fill=d.colour(), font=font)


def _screen(w: int, h: int, d: _Draw) -> Image.Image:
    """A window: a light or dark page, a coloured title bar, lines of small text and a few buttons."""
    light = d.uniform() < 0.7
    image = Image.new("RGB", (w, h), (245, 245, 245) if light else (30, 32, 36))
    draw = ImageDraw.Draw(image)
    bar = int(d.uniform(0.08, 0.2) * h)
    draw.rectangle((0, 0, w, bar), fill=d.colour())
    size = max(8, int(d.uniform(0.04, 0.09) * h))
    font = ImageFont.load_default(size=size)
    ink = (20, 20, 20) if light else (220, 220, 220)
    y = bar + size // 2
    while y < h:
        x = int(d.uniform(0.02, 0.1) * w)
        words = " ".join(d.choice(WORDS) for _ in range(d.integer(1, 6)))
        draw.text((x, y), words, fill=ink if d.uniform() < 0.8 else d.colour(), font=font)
        if d.uniform() < 0.15:
            bx = d.integer(0, max(0, w - 4 * size))
            draw.rounded_rectangle((bx, y, bx + 4 * size, y + size + 4), radius=size // 3, fill=d.colour())
        y += int(size * d.uniform(1.3, 2.2))
    return image


def drawn_picture(width: int, height: int, gen: torch.Generator) -> Tensor:
    """One drawn picture [3, height, width] in [0, 1]: a screen-like page (1 in 5), else a background
    (flat, gradient or pattern) with 1-8 shapes and 0-3 pieces of text."""
    d = _Draw(gen)
    w, h = width * SUPERSAMPLE, height * SUPERSAMPLE
    if d.uniform() < 0.2:
        image = _screen(w, h, d)
    else:
        image = _background(w, h, d)
        draw = ImageDraw.Draw(image)
        for _ in range(d.integer(1, 8)):
            _shape(draw, w, h, d)
        for _ in range(d.integer(0, 3)):
            _text(draw, w, h, d)
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
