"""The toy's first training phase: its autoencoder, on crops of photos and drawn pictures and of their task
targets, the latent pulled towards a linear code that already reconstructs well (see `patch_pca`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..step1x_ref.vae.autoencoder import AutoEncoder
from .data import EVAL_SHAPES, shape_views
from .plan import TrainPlan
from .tasks import GLOBAL_TASKS, psnr

PATCH = 8  # the latent's downscale: one latent pixel per 8x8 patch


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def random_task_images(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image replaced by one task's target at random: the autoencoder must also reproduce the edits."""
    picks = torch.randint(0, len(GLOBAL_TASKS), (x.shape[0],), generator=gen).tolist()
    return torch.stack([GLOBAL_TASKS[k].target(img[None])[0] for k, img in zip(picks, x, strict=True)])


def latent_norm_penalty(z: Tensor) -> Tensor:
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3))
    return mean.pow(2).mean() + (std - 1).pow(2).mean()


def pool_crops(pool: Tensor, count: int, side: int, gen: torch.Generator) -> Tensor:
    """`count` square crops [count, 3, side, side] of images drawn from `pool`, each at a random place."""
    crops = []
    for i in torch.randint(0, pool.shape[0], (count,), generator=gen).tolist():
        top, left = torch.randint(0, pool.shape[-1] - side + 1, (2,), generator=gen).tolist()
        crops.append(pool[i, :, top : top + side, left : left + side])
    return torch.stack(crops)


def patch_pca(images: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best linear code of `channels` numbers per 8x8 patch for `images` (in [-1, 1]): the patches' mean
    [192], their top principal directions [channels, 192] and each one's std [channels] (dividing by it whitens
    the code, as the DiT wants its latent). On the held-out images this code alone decodes (linearly) at
    27.9 dB at 128x128, where conv autoencoders of this size trained for 25 minutes reached 21."""
    patches = F.pixel_unshuffle(images, PATCH).permute(0, 2, 3, 1).reshape(-1, 3 * PATCH * PATCH)
    mean = patches.mean(0)
    _, s, v = torch.linalg.svd(patches - mean, full_matrices=False)
    return mean, v[:channels], s[:channels] / math.sqrt(patches.shape[0] - 1)


def pca_codes(x: Tensor, mean: Tensor, basis: Tensor, std: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> their whitened patch-PCA code [B, C, H/8, W/8]."""
    patches = F.pixel_unshuffle(x, PATCH).permute(0, 2, 3, 1)
    return (((patches - mean) @ basis.T) / std).permute(0, 3, 1, 2)


def train_autoencoder(ae: AutoEncoder, pool: Tensor, plan: TrainPlan, log) -> None:
    """Reconstruction (MSE + 0.1 L1 in [-1, 1]) on crops of the pool's images and of their task targets, plus
    the latent's pull to the patch-PCA code (and to N(0, 1) per channel)."""
    gen = torch.Generator().manual_seed(plan.seed + 10)
    pca = patch_pca(random_task_images(pool[::3], gen) * 2 - 1, ae.params.z_channels)
    opt = torch.optim.Adam(ae.parameters(), lr=plan.ae_lr)
    ae.train().requires_grad_(True)
    for step in range(plan.ae_steps):
        side = plan.ae_crops[step % len(plan.ae_crops)]
        x = random_task_images(pool_crops(pool, plan.ae_batch, side, gen), gen) * 2 - 1
        set_lr(opt, lr_at(step, plan.ae_steps, plan.ae_lr, plan.warmup))
        z = ae.encoder(x).chunk(2, dim=1)[0]
        out = ae.decoder(z)
        mse = F.mse_loss(out, x)
        loss = (mse + 0.1 * (out - x).abs().mean() + plan.latent_norm_weight * latent_norm_penalty(z)
                + plan.pca_weight * F.mse_loss(z, pca_codes(x, *pca)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == plan.ae_steps - 1:
            log(f"ae {step + 1}/{plan.ae_steps} {side} px x{x.shape[0]} mse {mse.item():.5f} "
                f"({10 * math.log10(4 / mse.item()):.2f} dB)")
    ae.eval().requires_grad_(False)


@torch.inference_mode()
def reconstruction_db(ae: AutoEncoder, shape: tuple[int, int], views_per_image: int = 1) -> float:
    """Mean PSNR of decode(encode(x)) over the held-out photos and graphics at `shape` (width, height): the
    ceiling every edit's figure there sits under."""
    _, views = shape_views(*shape, per_image=views_per_image)
    out = ae.decode(ae.encode(views * 2 - 1)).clamp(-1, 1) * 0.5 + 0.5
    return psnr(out, views).mean().item()


def reconstruction_report(ae: AutoEncoder) -> str:
    return ", ".join(f"{w}x{h} {reconstruction_db(ae, (w, h)):.2f}" for w, h in EVAL_SHAPES)
