"""What each deliberate difference from upstream's current inference.py costs, measured on CPU.

    python benchmarks/upstream_differences.py [--size-level 256] [--steps 28]

Upstream runs the VAE encode and the denoising loop under bf16 autocast with the latent state `x` in bf16,
draws the noise in bf16 from the device's generator, and encodes with a (unseeded) posterior sample. We
keep `x` in fp32, encode in fp32 with the posterior mean, and draw fp32 noise from a seeded CPU generator.
This script measures each of those on the tiny model (RANDOM weights: the figures show numerical
sensitivity, not a real edit's quality) and the input-resize filter on a real photo (scikit-image's
astronaut), printing one line per difference: relative error max|a - b| / max|b| of the final latent, and
PSNR of the output image against ours.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data

from step1x_export.step1x_ref.imaging import edit_size
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline, prepare_image, torch_step_fn
from step1x_export.step1x_ref.sampling import denoise, guided_euler, pack

PROMPT = "Make the sky behind the astronaut a deep purple"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def run(pipe: Step1XEditPipeline, inputs, *, ref=None, noise=None, bf16_state: bool = False, guidance=6.0):
    """The reference loop on `inputs`, optionally with another reference latent / noise, or x kept in bf16."""
    update = guided_euler(torch_step_fn(pipe.model, inputs, pipe.dtype))
    if bf16_state:  # upstream: x is a bf16 tensor, so every Euler update is rounded to bf16
        inner = update

        def update(*args):  # noqa: F811 (wraps the fp32 update)
            return inner(*args).bfloat16().float()

    x0 = noise if noise is not None else inputs.noise
    x0 = x0.bfloat16().float() if bf16_state else x0
    latent = denoise(update, x0, inputs.ref if ref is None else ref, inputs.timesteps, guidance=guidance,
                     truncate=pipe.config.cfg_truncate)
    return latent, pipe.decode(latent, inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-level", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    photo = Image.fromarray(skimage_data.astronaut())
    torch.set_grad_enabled(False)

    # 1. input resize: LANCZOS (upstream now) vs BICUBIC (the first release, and this package before)
    for level in (args.size_level, 1024):
        size = edit_size(*photo.size, level)
        a = np.asarray(photo.resize(size, Image.Resampling.LANCZOS), np.int16)
        b = np.asarray(photo.resize(size, Image.Resampling.BICUBIC), np.int16)
        diff = np.abs(a - b)
        print(f"resize LANCZOS vs BICUBIC, astronaut 512x512 -> {size}: max |diff| {diff.max()} levels, "
              f"{(diff > 0).mean():.1%} of values differ")

    pipe = Step1XEditPipeline.random("tiny", seed=0)
    inputs = pipe.prepare(photo, PROMPT, seed=0, steps=args.steps, size_level=args.size_level)
    ours, ours_img = run(pipe, inputs)

    # 2. latent state in bf16 (upstream) vs fp32 (ours)
    lat, img = run(pipe, inputs, bf16_state=True)
    print(f"latent state bf16 vs fp32 ({args.steps} steps): final latent rel err {rel(lat, ours):.2e}, "
          f"image PSNR {psnr(img, ours_img):.1f} dB")

    # 3. VAE encode under bf16 autocast (upstream) vs fp32 (ours)
    resized = prepare_image(photo, args.size_level, resample=pipe.config.input_resample).resized * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = pack(pipe.ae.encode(resized).float())
    lat, img = run(pipe, inputs, ref=ref_bf16)
    print(f"VAE encode bf16 autocast vs fp32: reference latent rel err {rel(ref_bf16, inputs.ref):.2e}; "
          f"final latent rel err {rel(lat, ours):.2e}, image PSNR {psnr(img, ours_img):.1f} dB")

    # 4. posterior sample (upstream, unseeded) vs mean (ours)
    sampled = pack(pipe.ae.encode(resized, sample=True, generator=torch.Generator().manual_seed(1)).float())
    lat, img = run(pipe, inputs, ref=sampled)
    print(f"VAE posterior sample vs mean: reference latent rel err {rel(sampled, inputs.ref):.2e}; "
          f"final latent rel err {rel(lat, ours):.2e}, image PSNR {psnr(img, ours_img):.1f} dB")

    # 5. the noise: bf16 noise (upstream's dtype) vs fp32 from the same draw
    lat, img = run(pipe, inputs, noise=inputs.noise.bfloat16().float())
    print(f"noise rounded to bf16 vs fp32 (same draw): final latent rel err {rel(lat, ours):.2e}, "
          f"image PSNR {psnr(img, ours_img):.1f} dB")


if __name__ == "__main__":
    main()
