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


# "Strongly red": chroma (max - min channel) over RED_CHROMA and hue within RED_HUE degrees of red, each edge
# soft over a ramp, so the target is a smooth function of the input. It picks out a red cup and saucer and
# leaves an orange-brown wooden table, skin and coffee alone (scikit-image's coffee photo at 192x128: 20% of
# the pixels, 36% of the 16x16 tokens).
RED_CHROMA, RED_CHROMA_RAMP = 0.25, 0.1
RED_HUE, RED_HUE_RAMP = 12.0, 6.0


def red_weight(x: Tensor) -> Tensor:
    """How strongly red each pixel of [B, 3, H, W] is, in [0, 1] ([B, 1, H, W])."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    chroma = r - torch.minimum(g, b)
    hue = 60 * (g - b) / chroma.clamp_min(1e-6)  # degrees from red, for pixels whose largest channel is red
    strong = ((chroma - RED_CHROMA) / RED_CHROMA_RAMP).clamp(0, 1)
    near_red = ((RED_HUE + RED_HUE_RAMP - hue.abs()) / RED_HUE_RAMP).clamp(0, 1)
    return strong * near_red * (r >= torch.maximum(g, b))


def red_to_green(x: Tensor) -> Tensor:
    """The strongly red pixels turned green (red and green exchanged there, by how red they are); the rest
    unchanged: an edit of part of the picture."""
    w = red_weight(x)
    return x + w * (x[:, [1, 0, 2]] - x)


@dataclass(frozen=True)
class Task:
    name: str
    target: Callable[[Tensor], Tensor]  # [B, 3, H, W] in [0, 1] -> the exact edited image, same shape
    english: tuple[str, ...]
    chinese: tuple[str, ...]

    @property
    def instructions(self) -> tuple[str, ...]:
        return self.english + self.chinese


# The tasks the first training phase learns (the autoencoder's targets come from these alone); LOCAL_TASKS
# join in the fine-tune (`TrainPlan.tune_steps`).
GLOBAL_TASKS: tuple[Task, ...] = (
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
LOCAL_TASKS: tuple[Task, ...] = (
    Task("red_to_green", red_to_green,
         ("make the red things green", "Turn everything red green.", "change the red objects to green"),
         ("把红色的东西变成绿色", "红色变绿色", "将红色物体改为绿色")),
)
# What the shipped weights learned: their first phase only (the fine-tunes tried did not learn the local task:
# docs/toy.md, "A local task, unknown instructions, faded inputs").
TASKS: tuple[Task, ...] = GLOBAL_TASKS


def trained_tasks(tune_steps: int) -> tuple[Task, ...]:
    """The tasks weights made with a fine-tune of `tune_steps` steps were trained on (and are scored on)."""
    return GLOBAL_TASKS + LOCAL_TASKS if tune_steps else GLOBAL_TASKS

# Instructions the toy does not know, trained against the unchanged picture: a model asked for what it cannot
# do leaves the picture alone rather than inventing. The held-out ones are never trained on: they measure
# whether that answer carries over to instructions it has never read.
UNKNOWN_TRAINING = Task(
    "unknown", unchanged,
    ("put sunglasses on the cat", "remove the background", "make it look like a watercolour painting",
     "add snow", "replace the sky with a sunset", "turn it into a cartoon", "add a dog next to it",
     "make it night time", "remove the text", "blur the background", "add a rainbow", "make the person smile",
     "change the season to autumn", "zoom in on the centre", "rotate it ninety degrees", "sharpen the photo",
     "add a frame around it", "make it look older", "put a bird in the sky", "draw a moustache on him"),
    ("给猫戴上墨镜", "去掉背景", "变成水彩画", "加上雪花", "把天空换成日落", "变成卡通风格", "在旁边加一只狗",
     "改成夜晚", "删除文字", "模糊背景", "加一道彩虹", "让人物微笑", "换成秋天", "放大中间部分", "旋转九十度",
     "锐化照片", "加一个相框", "让它看起来更旧", "在天空中加一只鸟", "给他画上胡子"))
UNKNOWN_HELDOUT = Task(
    "unknown_heldout", unchanged,
    ("add a hat", "make it look like an oil painting", "remove the cup", "add fireworks in the sky"),
    ("戴上一顶帽子", "变成油画", "把杯子去掉", "在天空中加上烟花"))
TASK_BY_NAME = {t.name: t for t in GLOBAL_TASKS + LOCAL_TASKS}


def known_tasks_text(tasks: tuple[Task, ...] = TASKS) -> str:
    """The toy model folder's `tasks.json`: its tasks and their phrasings, as the runtime reads them."""
    return known_tasks_json("toy", {t.name: t.instructions for t in tasks})


def task_for(instruction: str) -> Task | None:
    """The task an instruction belongs to (exact phrasing match, the local tasks too), or None."""
    return next((t for t in GLOBAL_TASKS + LOCAL_TASKS if instruction in t.instructions), None)


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of [B, 3, H, W] images in [0, 1] (peak 1); inf where they are equal."""
    mse = (output.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)
