"""FLUX AE: parity with diffusers' AutoencoderKL (an independent implementation), latent scaling,
seeded sampling, and the official checkpoint's key set."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from step1x_export.step1x_ref.configs import VAEParams, get_config
from step1x_export.step1x_ref.vae.autoencoder import AutoEncoder, VAEDecoder, VAEEncoder

TINY = get_config("tiny").vae
# A second shape: 3 levels (factor 4) whose width goes up then down (shortcut convs where the
# tiny config has none), one resnet per level, 8 latent channels. ch_mult[0] stays 1: diffusers'
# conv_in outputs block_out_channels[0], FLUX's outputs ch.
SMALL = replace(TINY, ch=32, ch_mult=(1, 2, 1), num_res_blocks=1, z_channels=8)
FP32_RTOL = 1e-5

FULL_PARAMS = 83_819_683  # the FLUX.1 AE in vae.safetensors
FULL_KEYS = 244


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_ae(params: VAEParams, seed: int = 0) -> AutoEncoder:
    """Seeded random weights; norm affines are perturbed too, so a swapped weight/bias shows."""
    torch.manual_seed(seed)
    ae = AutoEncoder(params).eval()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if ".norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return ae


def diffusers_ae(ae: AutoEncoder) -> AutoencoderKL:
    """diffusers' AutoencoderKL in the FLUX configuration, loaded through diffusers' own converter."""
    p = ae.params
    config = {
        "in_channels": p.in_channels,
        "out_channels": p.out_ch,
        "down_block_types": ("DownEncoderBlock2D",) * len(p.ch_mult),
        "up_block_types": ("UpDecoderBlock2D",) * len(p.ch_mult),
        "block_out_channels": tuple(p.ch * m for m in p.ch_mult),
        "layers_per_block": p.num_res_blocks,
        "latent_channels": p.z_channels,
        "norm_num_groups": 32,
        "scaling_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    ref = AutoencoderKL(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), config), strict=True)
    return ref


@pytest.fixture(scope="module", params=[TINY, SMALL], ids=["tiny", "small"])
def pair(request: pytest.FixtureRequest) -> tuple[AutoEncoder, AutoencoderKL]:
    ae = random_ae(request.param)
    return ae, diffusers_ae(ae)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)], ids=["64x64", "48x80"])
@torch.no_grad()
def test_parity_with_diffusers(pair: tuple[AutoEncoder, AutoencoderKL], hw: tuple[int, int]) -> None:
    ae, ref = pair
    p = ae.params
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1

    latent = ae.encode(x)
    ref_mean = ref.encode(x).latent_dist.mean
    f = 2 ** (len(p.ch_mult) - 1)
    assert latent.shape == (2, p.z_channels, hw[0] // f, hw[1] // f)
    assert rel_err(latent / p.scale_factor + p.shift_factor, ref_mean) <= FP32_RTOL

    image = ae.decode(latent)
    ref_image = ref.decode(latent / p.scale_factor + p.shift_factor).sample
    assert image.shape == x.shape
    assert rel_err(image, ref_image) <= FP32_RTOL

    # The export views compute the same maths on the same weights.
    assert torch.equal(VAEEncoder(ae)(x), latent)
    assert torch.equal(VAEDecoder(ae)(latent), image)


@torch.no_grad()
def test_scaling_and_sampling() -> None:
    ae = random_ae(TINY)
    p = ae.params
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean = ae.encoder(x).chunk(2, dim=1)[0]
    latent = ae.encode(x)
    torch.testing.assert_close(latent, p.scale_factor * (mean - p.shift_factor), rtol=0, atol=0)
    torch.testing.assert_close(ae.decode(latent), ae.decoder(mean), rtol=1e-5, atol=1e-5)

    s1 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    s2 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    s3 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(s1, s2)
    assert not torch.allclose(s1, latent) and not torch.allclose(s1, s3)


def expected_flux_ae_keys(levels: int = 4, blocks: int = 2) -> set[str]:
    """The key names of `vae.safetensors`, written out from the checkpoint's layout."""

    def resnet(prefix: str, shortcut: bool) -> list[str]:
        names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
        return [f"{prefix}.{n}" for n in names]

    def mid(prefix: str) -> list[str]:
        attn = [f"{prefix}.mid.attn_1.{n}" for n in ("norm", "q", "k", "v", "proj_out")]
        return resnet(f"{prefix}.mid.block_1", False) + attn + resnet(f"{prefix}.mid.block_2", False)

    # Widths 128, 128, 256, 512, 512: a width change (nin_shortcut) at encoder levels 1, 2 and
    # decoder levels 1, 0 (the decoder's level 3 starts at the bottom width, 512).
    modules = ["encoder.conv_in", "encoder.norm_out", "encoder.conv_out", *mid("encoder")]
    for i in range(levels):
        modules += [m for j in range(blocks) for m in resnet(f"encoder.down.{i}.block.{j}", j == 0 and i in (1, 2))]
        modules += [f"encoder.down.{i}.downsample.conv"] if i != levels - 1 else []
    modules += ["decoder.conv_in", "decoder.norm_out", "decoder.conv_out", *mid("decoder")]
    for i in range(levels):
        modules += [m for j in range(blocks + 1) for m in resnet(f"decoder.up.{i}.block.{j}", j == 0 and i in (0, 1))]
        modules += [f"decoder.up.{i}.upsample.conv"] if i != 0 else []
    return {f"{m}.{t}" for m in modules for t in ("weight", "bias")}


def test_full_config_matches_checkpoint_layout() -> None:
    params = get_config("v1.1").vae
    with torch.device("meta"):
        ae = AutoEncoder(params)
        ref = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    sd = ae.state_dict()
    assert set(sd) == expected_flux_ae_keys()
    assert len(sd) == FULL_KEYS
    assert not any("quant_conv" in k for k in sd)
    assert sum(p.numel() for p in ae.parameters()) == FULL_PARAMS
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    # Independent cross-check: diffusers' FLUX AE has the same parameters under the converter's map.
    assert sum(p.numel() for p in ref.parameters()) == FULL_PARAMS
    converted = convert_ldm_vae_checkpoint(sd, {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
