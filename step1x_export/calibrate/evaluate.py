"""Accuracy of a quantized DiT against the reference on held-out pairs: SQNR per step, PSNR of the image.

Per-step SQNR is teacher-forced: at every step both models see the reference trajectory's input, so
step i's figure is the error of one quantized DiT call, not an accumulation. The image PSNR is free
running: the quantized model denoises on its own, then both latents are decoded by the same VAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ..step1x_ref.pipeline import Step1XEditPipeline, torch_step_fn
from ..step1x_ref.sampling import denoise, guided_euler
from .dataset import CalibrationPair, load_pair_image


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2); inf when identical."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def psnr_db(a: Image.Image, b: Image.Image) -> float:
    """PSNR of two 8-bit RGB images (peak 255)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass
class PairReport:
    pair: CalibrationPair
    step_sqnr: list[float]  # dB, one per denoising step (teacher-forced)
    psnr: float  # dB, final image, free running


def evaluate_pair(pipe: Step1XEditPipeline, qmodel: nn.Module, pair: CalibrationPair, *, steps: int,
                  size_level: int, cfg: float = 6.0, seed: int = 0) -> PairReport:
    inputs = pipe.prepare(load_pair_image(pair), pair.instruction, seed=seed, steps=steps, size_level=size_level)
    ref_step = torch_step_fn(pipe.model, inputs, pipe.dtype)
    q_step = torch_step_fn(qmodel, inputs, pipe.dtype)
    sqnrs: list[float] = []

    def forced(img: Tensor, t: Tensor) -> Tensor:
        pred = ref_step(img, t)
        sqnrs.append(sqnr_db(pred, q_step(img, t)))
        return pred

    kw = {"guidance": cfg, "truncate": pipe.config.cfg_truncate}
    ref_latent = denoise(guided_euler(forced), inputs.noise, inputs.ref, inputs.timesteps, **kw)
    q_latent = denoise(guided_euler(q_step), inputs.noise, inputs.ref, inputs.timesteps, **kw)
    return PairReport(pair, sqnrs, psnr_db(pipe.decode(ref_latent, inputs), pipe.decode(q_latent, inputs)))


def evaluate(pipe: Step1XEditPipeline, qmodel: nn.Module, pairs: list[CalibrationPair], *, steps: int,
             size_level: int, cfg: float = 6.0, seed: int = 0, progress: bool = True) -> list[PairReport]:
    """`evaluate_pair` over `pairs` (pair i uses noise seed `seed + i`)."""
    with torch.inference_mode():
        return [evaluate_pair(pipe, qmodel, p, steps=steps, size_level=size_level, cfg=cfg, seed=seed + i)
                for i, p in enumerate(tqdm(pairs, desc="evaluating", unit="pair", disable=not progress))]


def summarize(reports: list[PairReport]) -> dict[str, float]:
    """Mean and min over (pairs x steps) of the per-step SQNR, and of the image PSNR."""
    s = [v for r in reports for v in r.step_sqnr]
    p = [r.psnr for r in reports]
    return {"sqnr_mean": float(np.mean(s)), "sqnr_min": float(np.min(s)), "psnr_mean": float(np.mean(p)),
            "psnr_min": float(np.min(p))}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per recipe (or variant)."""
    lines = ["| variant | DiT SQNR/step mean (dB) | min (dB) | image PSNR mean (dB) | min (dB) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['sqnr_mean']:.2f} | {r['sqnr_min']:.2f} | {r['psnr_mean']:.2f} "
                     f"| {r['psnr_min']:.2f} |")
    return "\n".join(lines)


def task_psnr(pipe: Step1XEditPipeline, qmodel: nn.Module, recipe: str, *, steps: int, size_level: int,
              cfg: float = 6.0, seed: int = 0, views_per_photo: int = 2) -> dict[str, list]:
    """For a model trained on edits with exact targets (`toy`): PSNR against the target per task on the
    held-out photos, for the reference DiT and the quantized one (same MLLM, VAE, noise and loop)."""
    from ..toy.evaluate import task_scores

    quantized = Step1XEditPipeline(pipe.config, qmodel, pipe.ae, pipe.embedder, device=pipe.device, dtype=pipe.dtype)

    def runner(p: Step1XEditPipeline):
        return lambda image, text: p.edit(image, text, seed=seed, steps=steps, cfg=cfg, size_level=size_level)

    return {name: task_scores(runner(p), size_level, views_per_photo=views_per_photo)
            for name, p in (("reference", pipe), (recipe, quantized))}
