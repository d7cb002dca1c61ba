"""The FLUX.1 autoencoder (BFL flux `modules/autoencoder.py` semantics).

An image in [-1, 1], [B, 3, H, W], maps to a latent [B, z_channels, H/8, W/8] (for 4 levels).
Module names reproduce the official `vae.safetensors` keys one for one (`encoder.down.{i}.block.{j}`,
`encoder.mid.attn_1`, `decoder.up.{i}.upsample.conv`, ...; no quant_conv), so a checkpoint loads
with `strict=True` and no remapping.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..configs import VAEParams


def _group_norm(channels: int) -> nn.GroupNorm:
    # Every norm of the FLUX AE: 32 groups, eps 1e-6, affine.
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1-projected where the width changes) skip."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # The checkpoint has `nin_shortcut` only where the width changes.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        # SiLU in place on the norm's fresh output when nothing is recorded for backward: the same values,
        # one full-resolution tensor fewer alive (the decoder's peak at 1024^2 drops by 1 GiB in fp32).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, proj_out are 1x1 convs (checkpoint layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        # One head of width c (scale 1/sqrt(c)); the explicit head axis keeps SDPA 4-D, which ONNX export needs.
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[-2], w=x.shape[-1])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The LDM/FLUX AE pads right and bottom only (asymmetric), before the conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (keys `mid.block_1/attn_1/block_2`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block.{j}` resnets, then an optional `downsample` or `upsample`.

    The FLUX AE has no attention inside levels (upstream's per-level `attn` lists are empty and
    hold no weights), so none is built here.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: Literal["down", "up"] | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in pairwise(widths))
        # The attribute name is the checkpoint key, so it differs between encoder and decoder.
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        elif resample is not None:
            raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")
        self.resample = resample

    def steps(self) -> list[nn.Module]:
        """The level's modules in order (its resnets, then the resampling)."""
        resample = {"down": "downsample", "up": "upsample"}.get(self.resample or "")
        return [*self.block, *([getattr(self, resample)] if resample else [])]

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps():
            x = step(x)
        return x


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> posterior moments [B, 2*z_channels, H/f, W/f] (mean, logvar)."""

    def __init__(self, params: VAEParams):
        super().__init__()
        widths = [params.ch * m for m in params.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3x3(params.in_channels, params.ch)
        # Level i goes from the previous level's width (ch for the first) to ch*ch_mult[i],
        # and halves the resolution except at the last level.
        self.down = nn.ModuleList(
            Level([params.ch, *widths][i], w, params.num_res_blocks, "down" if i != last else None)
            for i, w in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = _conv3x3(widths[-1], 2 * params.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]."""

    def __init__(self, params: VAEParams):
        super().__init__()
        widths = [params.ch * m for m in params.ch_mult]
        self.conv_in = _conv3x3(params.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        # `up` is indexed like the encoder's `down` (0 = full resolution) but runs from the last
        # index to 0. Level i goes from level i+1's width (the bottom width for the last level)
        # to ch*ch_mult[i] with one resnet more than the encoder, and doubles the resolution
        # except at level 0.
        self.up = nn.ModuleList(
            Level([*widths, widths[-1]][i + 1], w, params.num_res_blocks + 1, "up" if i != 0 else None)
            for i, w in enumerate(widths)
        )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = _conv3x3(widths[0], params.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            # Step by step rather than `level(h)`, which would keep the level's input alive until the level
            # returns: at 1024^2 the last level's input is a 1 GiB fp32 tensor, the decoder's peak.
            for step in level.steps():
                h = step(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


def scale_latent(z: Tensor, params: VAEParams) -> Tensor:
    """AE latent -> the DiT's latent space."""
    return params.scale_factor * (z - params.shift_factor)


def unscale_latent(latent: Tensor, params: VAEParams) -> Tensor:
    """The DiT's latent space -> AE latent (inverse of `scale_latent`)."""
    return latent / params.scale_factor + params.shift_factor


class AutoEncoder(nn.Module):
    """The FLUX AE; `encode`/`decode` work in the DiT's (scaled, shifted) latent space."""

    def __init__(self, params: VAEParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Image in [-1, 1] [B, 3, H, W] -> scaled latent [B, z, H/8, W/8].

        The posterior mean by default. `sample=True` draws `mean + std * noise` as upstream does,
        but from `generator` (upstream's draw is unseeded, so it cannot be reproduced exactly).
        """
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return scale_latent(z, self.params)

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent [B, z, h, w] -> image [B, 3, 8h, 8w], about [-1, 1]."""
        return self.decoder(unscale_latent(latent, self.params))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class VAEEncoder(nn.Module):
    """Export view of the encoder path: image -> scaled posterior mean. Shares `ae.encoder`'s weights."""

    def __init__(self, ae: AutoEncoder):
        super().__init__()
        self.params = ae.params
        self.encoder = ae.encoder  # same module, so the state dict keys stay `encoder.*`

    def forward(self, image: Tensor) -> Tensor:
        mean = self.encoder(image).chunk(2, dim=1)[0]
        return scale_latent(mean, self.params)


class VAEDecoder(nn.Module):
    """Export view of the decoder path: scaled latent -> image. Shares `ae.decoder`'s weights."""

    def __init__(self, ae: AutoEncoder):
        super().__init__()
        self.params = ae.params
        self.decoder = ae.decoder

    def forward(self, latent: Tensor) -> Tensor:
        return self.decoder(unscale_latent(latent, self.params))
