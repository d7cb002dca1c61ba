"""Our (official) DiT keys -> diffusers' `FluxTransformer2DModel` keys, for the parity tests.

The product's Step1X-Edit diffusers map (`step1x_ref.weights.diffusers_layout`) does all the re-layout (qkv and
linear1 splits, the final layer's swapped halves); diffusers' FLUX transformer differs from the Step1X
port only in the embedders' module names, renamed here. So `test_dit`'s parity with FLUX checks that map
numerically too.
"""

from __future__ import annotations

import torch

from step1x_export.step1x_ref.weights.diffusers_layout import dit_keymap

# Step1X diffusers port -> diffusers FLUX (time_embed / vec_embed are Step1XEditMLPEmbedder there)
FLUX_EMBEDDERS = {
    "time_embed.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_embed.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vec_embed.in_layer": "time_text_embed.text_embedder.linear_1",
    "vec_embed.out_layer": "time_text_embed.text_embedder.linear_2",
}


def dit_to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """BFL/Step1X DiT keys (connector dropped) -> diffusers FluxTransformer2DModel keys."""
    dit = {k: v for k, v in state.items() if not k.startswith("connector.")}
    out = {}
    for key, value in dit_keymap(hidden).to_diffusers(dit).items():
        stem, leaf = key.rsplit(".", 1)
        out[f"{FLUX_EMBEDDERS.get(stem, stem)}.{leaf}"] = value
    return out
