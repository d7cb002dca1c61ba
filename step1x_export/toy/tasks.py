"""The toy model's edits: each one's exact target, computed from the input, and its instructions.

Every target is a fixed function of the input pixels, so an edit's correctness is a number (PSNR
against the target), not a judgement. Instructions come in English and Chinese, several phrasings each;
the model never sees which phrasing belongs to which task except through its MLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..instructions import known_tasks_json

# ITU-R BT.601 luma: what PIL's convert("L") uses, so "black and white" means what image tools mean.
LUMA = (0.299, 0.587, 0.114)
# Brighter / darker: a 35% blend towards white / black (exact, no clipping, inverse-free).
LIGHT_BLEND = 0.35


def grayscale(x: Tensor) -> Tensor:
    y = sum(w * x[:, i] for i, w in enumerate(LUMA))
    return y.unsqueeze(1).expand_as(x).contiguous()


def swap_red_blue(x: Tensor) -> Tensor:
    return x[:, [2, 1, 0]]


def invert(x: Tensor) -> Tensor:
    return 1 - x


def mirror(x: Tensor) -> Tensor:
    return x.flip(-1)


def brighter(x: Tensor) -> Tensor:
    return x + LIGHT_BLEND * (1 - x)


def darker(x: Tensor) -> Tensor:
    return x * (1 - LIGHT_BLEND)


def unchanged(x: Tensor) -> Tensor:
    return x.clone()


@dataclass(frozen=True)
class Task:
    name: str
    target: Callable[[Tensor], Tensor]  # [B, 3, H, W] in [0, 1] -> the exact edited image, same shape
    english: tuple[str, ...]
    chinese: tuple[str, ...]

    @property
    def instructions(self) -> tuple[str, ...]:
        return self.english + self.chinese


TASKS: tuple[Task, ...] = (
    Task("black_and_white", grayscale,
         ("make it black and white", "Convert the photo to grayscale.", "remove all the colour"),
         ("把图片变成黑白的", "转换为灰度图", "去掉所有颜色")),
    Task("swap_red_blue", swap_red_blue,
         ("swap red and blue", "Exchange the red and blue channels.", "turn the reds blue and the blues red"),
         ("交换红色和蓝色", "把红色和蓝色互换", "红蓝通道对调")),
    Task("invert", invert,
         ("invert the colours", "Make a negative of this photo.", "invert the colors of the image"),
         ("反转颜色", "把照片变成底片效果", "颜色取反")),
    Task("mirror", mirror,
         ("mirror it left to right", "Flip the image horizontally.", "make a mirror image"),
         ("左右镜像", "水平翻转图片", "把图像左右翻转")),
    Task("brighter", brighter,
         ("make it brighter", "Brighten the photo.", "increase the brightness"),
         ("让图片更亮", "提高亮度", "把照片调亮一些")),
    Task("darker", darker,
         ("make it darker", "Darken the photo.", "decrease the brightness"),
         ("让图片更暗", "降低亮度", "把照片调暗一些")),
    Task("no_change", unchanged,
         ("keep the image as it is", "Do not change anything.", "leave the photo unchanged"),
         ("保持原样", "不要做任何修改", "图片保持不变")),
)
TASK_BY_NAME = {t.name: t for t in TASKS}


def known_tasks_text() -> str:
    """The toy model folder's `tasks.json`: its tasks and their phrasings, as the runtime reads them."""
    return known_tasks_json("toy", {t.name: t.instructions for t in TASKS})


def task_for(instruction: str) -> Task | None:
    """The task an instruction belongs to (exact phrasing match), or None."""
    return next((t for t in TASKS if instruction in t.instructions), None)


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of [B, 3, H, W] images in [0, 1] (peak 1); inf where they are equal."""
    mse = (output.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)
