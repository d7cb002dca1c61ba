"""Literal key maps from our (official) names to diffusers' names, for parity tests only."""

from __future__ import annotations

import torch


def _swap_shift_scale(w: torch.Tensor) -> torch.Tensor:
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def dit_to_diffusers(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """BFL/Step1X DiT keys (connector dropped) -> diffusers FluxTransformer2DModel keys."""
    out: dict[str, torch.Tensor] = {}
    plain = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    double = {
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
    }
    single = {
        "modulation.lin": "norm.linear",
        "norm.query_norm.scale": "attn.norm_q.weight",
        "norm.key_norm.scale": "attn.norm_k.weight",
        "linear2": "proj_out",
    }
    for key, value in state.items():
        if key.startswith("connector."):
            continue
        stem, leaf = key.rsplit(".", 1)
        if key.startswith("final_layer.adaLN_modulation.1"):
            out[f"norm_out.linear.{leaf}"] = _swap_shift_scale(value)
        elif stem in plain:
            out[f"{plain[stem]}.{leaf}"] = value
        elif key.startswith("double_blocks."):
            _, i, rest = key.split(".", 2)
            prefix = f"transformer_blocks.{i}"
            rstem = rest.rsplit(".", 1)[0]
            if rstem in ("img_attn.qkv", "txt_attn.qkv"):
                img_names, txt_names = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")
                names = img_names if rstem.startswith("img") else txt_names
                for name, part in zip(names, value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.attn.{name}.{leaf}"] = part
            elif rest in double:
                out[f"{prefix}.{double[rest]}"] = value
            else:
                out[f"{prefix}.{double[rstem]}.{leaf}"] = value
        elif key.startswith("single_blocks."):
            _, i, rest = key.split(".", 2)
            prefix = f"single_transformer_blocks.{i}"
            rstem = rest.rsplit(".", 1)[0]
            if rstem == "linear1":
                q, k, v, mlp = value.split([hidden, hidden, hidden, value.shape[0] - 3 * hidden], dim=0)
                for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (q, k, v, mlp), strict=True):
                    out[f"{prefix}.{name}.{leaf}"] = part
            elif rest in single:
                out[f"{prefix}.{single[rest]}"] = value
            else:
                out[f"{prefix}.{single[rstem]}.{leaf}"] = value
        else:
            raise KeyError(f"no diffusers name for {key}")
    return out
