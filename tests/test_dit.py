"""DiT parity with diffusers' FluxTransformer2DModel, connector properties, full-size key layout."""

from __future__ import annotations

import pytest
import torch
from keymaps import dit_to_diffusers

from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.math import rope_table
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.sampling import position_ids
from step1x_export.step1x_ref.weights.random_weights import randomize_


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_model(name: str = "tiny", seed: int = 0) -> Step1XEdit:
    return randomize_(Step1XEdit(get_config(name)), seed).eval()


@pytest.mark.parametrize(("h_tok", "w_tok", "version"), [(4, 4, "v1.1"), (3, 5, "v1.0")])
def test_dit_matches_diffusers_flux(h_tok: int, w_tok: int, version: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = get_config("tiny" if version == "v1.1" else "tiny-v1.0")
    p = cfg.dit
    ours = tiny_model(cfg.name)
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=p.in_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.hidden_size // p.num_heads,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=False,
        axes_dims_rope=p.axes_dim,
    ).eval()
    ref.load_state_dict(dit_to_diffusers(ours.state_dict(), p.hidden_size), strict=True)

    gen = torch.Generator().manual_seed(1)
    txt_len, n = 12, h_tok * w_tok
    img = torch.randn(2, 2 * n, p.in_channels, generator=gen)
    txt = torch.randn(2, txt_len, p.context_in_dim, generator=gen)
    y = torch.randn(2, p.vec_in_dim, generator=gen)
    t = torch.tensor([0.7, 0.7])
    ids = position_ids(txt_len, h_tok, w_tok, cfg.version)
    with torch.no_grad():
        out = ours.transformer(img, txt, y, t, rope_table(ids, p.axes_dim, p.theta))
        expected = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=ids[0, txt_len:],
            txt_ids=ids[0, :txt_len],
        ).sample
    assert out.shape == (2, 2 * n, p.out_channels)
    err = rel_err(out, expected)
    print(f"DiT vs diffusers FluxTransformer2DModel ({h_tok}x{w_tok} tokens, {version}): max rel err {err:.2e}")
    assert err <= 1e-5


def test_connector_ignores_padding_contents() -> None:
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 20, 64, generator=gen)
    mask = torch.zeros(1, 20, dtype=torch.long)
    mask[:, :13] = 1
    noisy = emb.clone()
    noisy[:, 13:] = torch.randn(1, 7, 64, generator=gen) * 10
    t = torch.tensor([0.5])
    with torch.no_grad():
        txt_a, y_a = model.connector(emb, t, mask)
        txt_b, y_b = model.connector(noisy, t, mask)
    assert rel_err(txt_b[:, :13], txt_a[:, :13]) < 1e-6
    assert rel_err(y_b, y_a) < 1e-6
    assert rel_err(txt_b[:, 13:], txt_a[:, 13:]) > 1e-3  # padded rows do change: the check has teeth


@pytest.mark.parametrize(("name", "params", "extra"), [("v1.0", 12_427_800_385, True), ("v1.1", 12_427_800_384, False)])
def test_full_size_key_layout_on_meta(name: str, params: int, extra: bool) -> None:
    with torch.device("meta"):
        model = Step1XEdit(get_config(name))
    keys = set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == params
    assert ("connector.scale_factor" in keys) is extra
    assert not any(k.startswith("guidance_in") for k in keys)
    sd = model.state_dict()
    assert sd["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert sd["single_blocks.37.linear2.weight"].shape == (3072, 15360)
    assert sd["connector.global_proj_out.weight"].shape == (768, 3584)
    assert "single_blocks.38.linear1.weight" not in keys and "double_blocks.18.img_mod.lin.weight" in keys
    expected_suffixes = [
        "img_in.weight", "time_in.in_layer.weight", "time_in.out_layer.weight", "vector_in.in_layer.weight",
        "vector_in.out_layer.weight", "txt_in.weight", "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight", "connector.S.input_embedder.weight",
        "connector.S.t_embedder.mlp.0.weight", "connector.S.t_embedder.mlp.2.weight",
        "connector.S.c_embedder.linear_1.weight", "connector.S.c_embedder.linear_2.weight",
    ]
    for i in range(19):
        for s in ("img", "txt"):
            expected_suffixes += [
                f"double_blocks.{i}.{s}_mod.lin.weight", f"double_blocks.{i}.{s}_attn.qkv.bias",
                f"double_blocks.{i}.{s}_attn.norm.query_norm.scale", f"double_blocks.{i}.{s}_attn.norm.key_norm.scale",
                f"double_blocks.{i}.{s}_attn.proj.weight", f"double_blocks.{i}.{s}_mlp.0.weight",
                f"double_blocks.{i}.{s}_mlp.2.weight",
            ]
    for i in range(38):
        expected_suffixes += [
            f"single_blocks.{i}.linear1.weight", f"single_blocks.{i}.linear2.weight",
            f"single_blocks.{i}.norm.query_norm.scale", f"single_blocks.{i}.norm.key_norm.scale",
            f"single_blocks.{i}.modulation.lin.weight",
        ]
    for b in (0, 1):
        for m in ("norm1", "self_attn_qkv", "self_attn_proj", "norm2", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected_suffixes.append(f"connector.S.individual_token_refiner.blocks.{b}.{m}.weight")
    missing = [k for k in expected_suffixes if k not in keys]
    assert not missing, missing
