"""The calibration set: real photographs bundled with scikit-image, paired with edit instructions.

The instructions cover GEdit-Bench's 11 task types in English and Chinese (each English instruction
has a Chinese twin), a few with quoted text, which the MLLM embedder re-tokenises one character at a
time. The held-out split (for evaluating a quantized model) is chosen by a stable hash of the pair,
so it never changes when pairs are added elsewhere in the list.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from PIL import Image

DATASET_VERSION = "skimage-gedit-v1"
TASKS = (
    "background_change", "color_alteration", "material_modification", "motion_change", "portrait_retouching",
    "style_transfer", "subject_addition", "subject_removal", "subject_replacement", "text_modification",
    "tone_transformation",
)
Language = Literal["en", "zh"]


@dataclass(frozen=True)
class CalibrationPair:
    image: str  # scikit-image photograph name (see `IMAGES`)
    instruction: str
    task: str  # one of TASKS
    language: Language

    @property
    def key(self) -> str:
        return f"{self.image}|{self.language}|{self.instruction}"


# Photographs that scikit-image ships inside its wheel (no download): name -> `skimage.data` loader (and what
# to take of its result). Imported when an image is first read, so the statistics collector that imports this
# module runs where scikit-image is not installed (a GPU machine without an index).
IMAGES: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),
    "chelsea": ("chelsea", None),  # the cat
    "coffee": ("coffee", None),
    "rocket": ("rocket", None),
    "camera": ("camera", None),  # greyscale cameraman
    "coins": ("coins", None),
    "text": ("text", None),  # greyscale street-sign text
    "moon": ("moon", None),
    "hubble": ("hubble_deep_field", None),
    "motorcycle": ("stereo_motorcycle", 0),
}

# (image, task, English, Chinese): every row yields two pairs.
_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("astronaut", "background_change", "Replace the background with a beach at sunset", "把背景换成日落时的海滩"),
    ("astronaut", "portrait_retouching", "Smooth her skin and brighten her eyes", "让她的皮肤更光滑，眼睛更明亮"),
    ("astronaut", "style_transfer", "Turn the photo into a Van Gogh oil painting", "把照片变成梵高风格的油画"),
    ("astronaut", "subject_addition", "Add a small dog sitting next to her", "在她旁边加一只坐着的小狗"),
    ("astronaut", "text_modification", 'Write "NASA 2025" on the flag', '在旗子上写上"NASA 2025"'),
    ("chelsea", "color_alteration", "Make the cat's fur pure white", "把猫的毛变成纯白色"),
    ("chelsea", "motion_change", "Make the cat yawn with its mouth wide open", "让猫张大嘴打哈欠"),
    ("chelsea", "subject_replacement", "Replace the cat with a red fox", "把猫换成一只红狐狸"),
    ("chelsea", "tone_transformation", "Make it look like a snowy winter morning", "让画面看起来像下雪的冬日清晨"),
    ("chelsea", "subject_addition", "Put a tiny wizard hat on the cat", "给猫戴上一顶小巫师帽"),
    ("coffee", "material_modification", "Make the cup out of transparent glass", "把杯子变成透明玻璃材质"),
    ("coffee", "color_alteration", "Change the saucer to dark green", "把碟子改成深绿色"),
    ("coffee", "subject_removal", "Remove the spoon from the saucer", "去掉碟子上的勺子"),
    ("coffee", "text_modification", 'Add the word "Latte" in foam on the coffee', '在咖啡的奶泡上写"拿铁"'),
    ("coffee", "style_transfer", "Render it as a pencil sketch", "把它画成铅笔素描"),
    ("rocket", "background_change", "Put the rocket on the surface of Mars", "把火箭放到火星表面"),
    ("rocket", "tone_transformation", "Turn the scene into night with dramatic lighting",
     "把场景变成夜晚，光线更有戏剧性"),
    ("rocket", "subject_removal", "Remove the launch tower", "移除发射塔"),
    ("rocket", "material_modification", "Make the rocket look like it is made of wood", "让火箭看起来是木头做的"),
    ("camera", "color_alteration", "Colorize this black and white photo", "给这张黑白照片上色"),
    ("camera", "portrait_retouching", "Give the man a neatly trimmed beard", "给这个男人加上修剪整齐的胡子"),
    ("camera", "motion_change", "Make the man raise his right hand and wave", "让这个男人举起右手挥手"),
    ("camera", "subject_replacement", "Replace the tripod camera with a telescope", "把三脚架上的相机换成望远镜"),
    ("coins", "material_modification", "Make all the coins solid gold", "把所有硬币变成纯金的"),
    ("coins", "subject_addition", "Add a banknote under the coins", "在硬币下面加一张纸币"),
    ("coins", "tone_transformation", "Give the photo a warm vintage tone", "给照片加上温暖的复古色调"),
    ("text", "text_modification", 'Change the text to "OPEN 24 HOURS"', '把文字改成"24小时营业"'),
    ("text", "style_transfer", "Make it look like a neon sign at night", "让它看起来像夜晚的霓虹灯招牌"),
    ("text", "subject_removal", "Erase all the text", "擦掉所有文字"),
    ("moon", "color_alteration", "Make the moon glow orange like a harvest moon", "让月亮发出丰收月那样的橙色光"),
    ("moon", "subject_addition", "Add a flying spaceship in front of the moon", "在月亮前面加一艘飞行的宇宙飞船"),
    ("moon", "style_transfer", "Turn it into a watercolor illustration", "把它变成水彩插画"),
    ("hubble", "background_change", "Replace the galaxies with a starry night over mountains", "把星系换成山上的星空"),
    ("hubble", "tone_transformation", "Make the colors cooler and more blue", "让颜色更冷、更偏蓝"),
    ("motorcycle", "subject_replacement", "Replace the motorcycle with a bicycle", "把摩托车换成自行车"),
    ("motorcycle", "color_alteration", "Paint the motorcycle bright red", "把摩托车漆成鲜红色"),
    ("motorcycle", "motion_change", "Show the motorcycle tilted as if turning fast", "让摩托车倾斜，好像正在快速转弯"),
    ("motorcycle", "text_modification", 'Add a license plate that reads "STEP 1X"', '加一个写着"STEP 1X"的车牌'),
    ("motorcycle", "portrait_retouching", "Add a rider wearing a black helmet", "加一位戴黑色头盔的骑手"),
)


def calibration_pairs() -> list[CalibrationPair]:
    """All pairs (English then Chinese twin, row by row): 2 x len(_ROWS) >= 64."""
    pairs = []
    for image, task, en, zh in _ROWS:
        pairs += [CalibrationPair(image, en, task, "en"), CalibrationPair(image, zh, task, "zh")]
    return pairs


def _is_held_out(pair: CalibrationPair, every: int) -> bool:
    return int(hashlib.sha256(pair.key.encode()).hexdigest(), 16) % every == 0


def split_pairs(
    pairs: list[CalibrationPair] | None = None, *, held_out_every: int = 8
) -> tuple[list[CalibrationPair], list[CalibrationPair]]:
    """(calibration, held_out): about 1 in `held_out_every` pairs held out, chosen by a stable hash."""
    pairs = calibration_pairs() if pairs is None else pairs
    held = [p for p in pairs if _is_held_out(p, held_out_every)]
    return [p for p in pairs if not _is_held_out(p, held_out_every)], held


@cache
def _image_array(name: str) -> np.ndarray:
    try:
        loader, part = IMAGES[name]
    except KeyError:
        raise ValueError(f"unknown calibration image {name!r}; known: {', '.join(IMAGES)}") from None
    try:
        from skimage import data as skimage_data
    except ImportError as err:
        raise ImportError("the calibration photographs need scikit-image: pip install scikit-image "
                          "(or carry its wheel)") from err
    image = getattr(skimage_data, loader)()
    return np.asarray(image if part is None else image[part])


def load_pair_image(pair: CalibrationPair) -> Image.Image:
    """The pair's photograph as an RGB PIL image (greyscale ones converted)."""
    return Image.fromarray(_image_array(pair.image)).convert("RGB")


def describe(pairs: list[CalibrationPair]) -> dict:
    """What an artifact records about the set it was calibrated on."""
    return {
        "dataset": DATASET_VERSION,
        "pairs": len(pairs),
        "images": sorted({p.image for p in pairs}),
        "tasks": sorted({p.task for p in pairs}),
        "languages": sorted({p.language for p in pairs}),
        "keys_sha256": hashlib.sha256("\n".join(p.key for p in pairs).encode()).hexdigest(),
    }
