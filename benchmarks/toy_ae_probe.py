"""Train the toy autoencoder alone from one recipe and score its held-out reconstruction per shape.

    PYTHONPATH=$PWD python benchmarks/toy_ae_probe.py --steps 600 [recipe options] [--png-dir /tmp/probe]

An experiment, not the shipped plan (`step1x_export.toy.train` is untouched): seeded, one CPU thread, the
toy's autoencoder architecture (`get_config("toy").vae`, width and GroupNorm groups overridable). Training
images: a pool of augmented 128x128 crops of the training photos and, for `--drawn-share`, pictures the
script draws (`toy.drawn`); each step takes square crops of one side (cycling through `--crops`) from the
pool, each replaced by a random task's target as the shipped phase does. Printed at the end (and every
`--eval-every` steps): decode(encode(x)) PSNR on the held-out photos and graphics at 64x64, 128x128 and
192x128 (their centre crops, `toy.data.shape_views`), and the decoded images' per-channel std over the
target's (1.0 keeps contrast) and their colour (chroma) over the target's (near 0: decoded grey), with the
step count and wall time.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.vae.autoencoder import AutoEncoder
from step1x_export.toy.autoencoder_phase import (
    latent_norm_penalty,
    lr_at,
    patch_pca,
    pca_codes,
    pool_crops,
    random_task_images,
    set_lr,
)
from step1x_export.toy.data import (
    HELDOUT_PHOTOS,
    TRAIN_PHOTOS,
    augmented_crop,
    photo_tensors,
    shape_views,
)
from step1x_export.toy.drawn import drawn_picture
from step1x_export.toy.tasks import psnr

SHAPES = ((64, 64), (128, 128), (192, 128))
POOL_SIDE = 128


def build_pool(count: int, drawn_share: float, seed: int) -> Tensor:
    """`count` training images [count, 3, 128, 128]: photo crops (augmented) or drawn pictures."""
    gen = torch.Generator().manual_seed(seed + 30)
    photos = photo_tensors(TRAIN_PHOTOS, max_short_side=320)
    images = []
    for _ in range(count):
        if float(torch.rand((), generator=gen)) < drawn_share:
            images.append(drawn_picture(POOL_SIDE, POOL_SIDE, gen))
        else:
            photo = photos[int(torch.randint(0, len(photos), (), generator=gen))]
            images.append(augmented_crop(photo, POOL_SIDE, gen))
    return torch.stack(images)


def build_autoencoder(width: int, groups: int, seed: int, ch_mult: tuple[int, ...] | None = None,
                      res_blocks: int | None = None) -> AutoEncoder:
    params = replace(get_config("toy").vae, ch=width)
    if ch_mult is not None:
        params = replace(params, ch_mult=ch_mult)
    if res_blocks is not None:
        params = replace(params, num_res_blocks=res_blocks)
    torch.manual_seed(seed + 1)
    ae = AutoEncoder(params)
    for m in ae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            if m.num_channels % groups:
                raise ValueError(f"--groups {groups} does not divide a norm's {m.num_channels} channels")
            m.num_groups = groups  # GroupNorm reads it in forward; its affine weights are per channel
    return ae


def reconstruction_loss(out: Tensor, x: Tensor, loss: str, edge_weight: float, colour_weight: float) -> Tensor:
    if loss == "mse+l1":
        value = F.mse_loss(out, x) + 0.1 * (out - x).abs().mean()
    elif loss == "l1":
        value = (out - x).abs().mean()
    elif loss == "mse":
        value = F.mse_loss(out, x)
    else:
        raise ValueError(f"--loss must be mse+l1, l1 or mse, got {loss!r}")
    if edge_weight:
        dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        value = value + edge_weight * ((dx(out) - dx(x)).abs().mean() + (dy(out) - dy(x)).abs().mean())
    if colour_weight:
        grey_free = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
        value = value + colour_weight * (grey_free(out) - grey_free(x)).abs().mean()
    return value


def chroma(x: Tensor) -> Tensor:
    """Per image, the mean distance of a pixel's channels from their mean: 0 for a grey picture."""
    return (x - x.mean(1, keepdim=True)).abs().mean(dim=(1, 2, 3))


@torch.inference_mode()
def evaluate(ae: AutoEncoder, png_dir: Path | None, tag: str) -> list[str]:
    """One line per shape: photos / graphics PSNR and the decoded std over the target's."""
    ae.eval()
    lines = []
    for w, h in SHAPES:
        names, views = shape_views(w, h)
        out = ae.decoder(ae.encoder(views * 2 - 1).chunk(2, dim=1)[0]).clamp(-1, 1) * 0.5 + 0.5
        db = psnr(out, views)
        ratio = (out.std(dim=(2, 3)) / views.std(dim=(2, 3)).clamp_min(1e-3)).mean(1)
        colour = chroma(out) / chroma(views).clamp_min(1e-3)
        n = len(HELDOUT_PHOTOS)
        lines.append(f"{w}x{h}: photos {db[:n].mean():.2f} dB, graphics {db[n:].mean():.2f} dB, "
                     f"all {db.mean():.2f}; std ratio photos {ratio[:n].mean():.2f} graphics {ratio[n:].mean():.2f}; "
                     f"colour ratio photos {colour[:n].mean():.2f} graphics {colour[n:].mean():.2f}")
        if png_dir is not None:
            from step1x_export.step1x_ref.imaging import tensor_to_pil

            png_dir.mkdir(parents=True, exist_ok=True)
            for k, name in enumerate(names):
                pair = torch.cat([views[k], out[k]], dim=-1)
                tensor_to_pil(pair).save(png_dir / f"{tag}_{w}x{h}_{name.split(':')[-1].split('/')[0]}.png")
    ae.train()
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps [600]")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, pool and draws [0]")
    p.add_argument("--pool", type=int, default=600, help="training images in the pool, 128x128 each [600]")
    p.add_argument("--drawn-share", type=float, default=0.0, help="share of drawn pictures in the pool [0]")
    p.add_argument("--crops", type=int, nargs="+", default=[64], help="crop sides (px, <= 128), cycled per step [64]")
    p.add_argument("--pixels", type=int, default=8192, help="pixels a step: batch = pixels // side^2 [8192]")
    p.add_argument("--batch", type=int, help="fixed batch at every crop side (overrides --pixels)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam lr, warm-up 100 then cosine to 10%% [1e-3]")
    p.add_argument("--latent-norm-weight", type=float, default=0.05, help="weight of the latent N(0,1) penalty [0.05]")
    p.add_argument("--loss", default="mse+l1", choices=("mse+l1", "l1", "mse"), help="reconstruction loss [mse+l1]")
    p.add_argument("--edge-weight", type=float, default=0.0, help="weight of an L1 loss on image gradients [0]")
    p.add_argument("--colour-weight", type=float, default=0.0,
                   help="weight of an L1 loss on each pixel's channels minus their mean (its colour) [0]")
    p.add_argument("--width", type=int, default=96, help="autoencoder width ch (multiple of 32) [96, the toy's]")
    p.add_argument("--ch-mult", type=int, nargs=4, help="width multiples of the 4 levels [1 1 1 1, the toy's]")
    p.add_argument("--res-blocks", type=int, help="encoder resnets a level (the decoder's: one more) [0, the toy's]")
    p.add_argument("--groups", type=int, default=32, help="GroupNorm groups in every norm [32, FLUX's]")
    p.add_argument("--pca-weight", type=float, default=0.0,
                   help="weight of an MSE pulling the latent to the whitened 8x8 patch-PCA code [0]")
    p.add_argument("--pca-decoder-weight", type=float, default=0.0,
                   help="weight of the decoder's reconstruction from the PCA code itself (faded as --pca-weight) [0]")
    p.add_argument("--pca-until", type=float, default=1.0,
                   help="share of the steps the PCA pull lasts, fading linearly to 0 [1.0: to the end]")
    p.add_argument("--no-tasks", action="store_true", help="train on the images only, not task targets too")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps [0: only at the end]")
    p.add_argument("--png-dir", type=Path, help="write input|decoded PNGs of the held-out images here")
    p.add_argument("--tag", default="probe", help="PNG file prefix [probe]")
    args = p.parse_args(argv)
    if any(not 8 <= c <= POOL_SIDE or c % 8 for c in args.crops):
        p.error(f"--crops must be multiples of 8 in [8, {POOL_SIDE}], got {args.crops}")

    torch.set_num_threads(1)
    start = time.perf_counter()
    pool = build_pool(args.pool, args.drawn_share, args.seed)
    ae = build_autoencoder(args.width, args.groups, args.seed, args.ch_mult and tuple(args.ch_mult), args.res_blocks)
    print(f"[{time.perf_counter() - start:6.1f} s] pool {tuple(pool.shape)}, autoencoder "
          f"{sum(q.numel() for q in ae.parameters()) / 1e6:.2f} M params; {vars(args)}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 10)
    opt = torch.optim.Adam(ae.parameters(), lr=args.lr)
    if args.pca_weight:
        gen_pca = torch.Generator().manual_seed(args.seed + 40)
        pca = patch_pca(random_task_images(pool[::3], gen_pca) * 2 - 1, ae.params.z_channels)
    ae.train()
    for step in range(args.steps):
        side = args.crops[step % len(args.crops)]
        count = args.batch or max(1, args.pixels // side**2)
        x = pool_crops(pool, count, side, gen)
        if not args.no_tasks:
            x = random_task_images(x, gen)
        x = x * 2 - 1
        set_lr(opt, lr_at(step, args.steps, args.lr, 100))
        z = ae.encoder(x).chunk(2, dim=1)[0]
        out = ae.decoder(z)
        loss = reconstruction_loss(out, x, args.loss, args.edge_weight, args.colour_weight)
        if args.latent_norm_weight:
            loss = loss + args.latent_norm_weight * latent_norm_penalty(z)
        fade = max(0.0, 1 - step / max(1.0, args.pca_until * args.steps))
        if args.pca_weight and fade:
            codes = pca_codes(x, *pca)
            loss = loss + args.pca_weight * fade * F.mse_loss(z, codes)
            if args.pca_decoder_weight:
                taught = ae.decoder(codes)
                loss = loss + args.pca_decoder_weight * fade * reconstruction_loss(taught, x, args.loss, 0, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            mse = F.mse_loss(out, x).item()
            print(f"[{time.perf_counter() - start:6.1f} s] step {step + 1}/{args.steps} {side} px x{count} "
                  f"train {10 * math.log10(4 / mse):.2f} dB, latent std {z.std().item():.2f}", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            for line in evaluate(ae, None, args.tag):
                print(f"[{time.perf_counter() - start:6.1f} s]   eval@{step + 1} {line}", flush=True)
    train_s = time.perf_counter() - start
    for line in evaluate(ae, args.png_dir, args.tag):
        print(f"final@{args.steps} ({train_s:.0f} s) {line}", flush=True)


if __name__ == "__main__":
    main()
