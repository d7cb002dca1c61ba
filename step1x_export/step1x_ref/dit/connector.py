"""Qwen2Connector: refines the MLLM's hidden states into the DiT's text tokens and pooled vector.

Key names follow the official checkpoint (`connector.S.*`, `connector.global_proj_out`,
`connector.scale_factor` in v1.0 only).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..configs import ConnectorParams
from .math import timestep_embedding


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real tokens: x [B, L, C], mask [B, L] (0/1) -> [B, C]."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def pairwise_mask(mask: Tensor) -> Tensor:
    """[B, L] padding mask -> [B, 1, L, L] boolean attention mask, real x real only.

    Column 0 is always allowed so that padding rows (all-False otherwise) do not give NaN.
    """
    m = mask.bool()
    pair = m[:, None, None, :] & m[:, None, :, None]
    pair[..., 0] = True
    return pair


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        # `dtype` is the activations' (upstream reads mlp[0]'s weight dtype, which is wrong once it is quantized).
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class TextProjection(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size, bias=True)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=True)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class IndividualTokenRefinerBlock(nn.Module):
    """Pre-LN self-attention + MLP over the text tokens, each branch gated by the conditioning c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = RefinerMLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor) -> Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        q, k, v = rearrange(self.self_attn_qkv(self.norm1(x)), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + gate_msa.unsqueeze(1) * self.self_attn_proj(rearrange(attn, "B H L D -> B L (H D)"))
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.blocks = nn.ModuleList(
            IndividualTokenRefinerBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth)
        )

    def forward(self, x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
        attn_mask = pairwise_mask(mask)
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class SingleTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.input_embedder = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(params.hidden_size)
        self.c_embedder = TextProjection(params.in_channels, params.hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(params)

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        c = self.t_embedder(t, x.dtype) + self.c_embedder(masked_mean(x, mask))
        return self.individual_token_refiner(self.input_embedder(x), c, mask)


class Qwen2Connector(nn.Module):
    def __init__(self, params: ConnectorParams, *, with_scale_factor: bool):
        super().__init__()
        self.time_factor = params.time_factor
        self.S = SingleTokenRefiner(params)
        self.global_proj_out = nn.Linear(params.in_channels, params.global_dim)
        # v1.0 only: the pooled embedding is scaled by (1 + scale_factor); initialised as upstream.
        self.scale_factor = nn.Parameter(torch.full((1,), -(1 - 0.09))) if with_scale_factor else None

    def forward(self, llm_embedding: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """llm_embedding [B, L, C_llm], t [B] in [0, 1], mask [B, L] -> (txt [B, L, C], y [B, global_dim])."""
        pooled = masked_mean(llm_embedding, mask)
        if self.scale_factor is not None:
            pooled = pooled * (1 + self.scale_factor.to(pooled.dtype))
        return self.S(llm_embedding, t * self.time_factor, mask), self.global_proj_out(pooled)
