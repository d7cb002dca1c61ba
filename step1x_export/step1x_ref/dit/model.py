"""Step1X-Edit denoiser: Qwen2Connector + FLUX-style DiT (BFL flux `model.py` layout).

Parameter names equal the official checkpoint's, so it loads with strict=True and no remapping.
The forward signature is the export signature of the "dit" component: the connector runs inside
every step (it depends on t), and RoPE enters as a precomputed table `pe` (see `math.rope_table`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..configs import ModelConfig
from .connector import Qwen2Connector
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock
from .math import timestep_embedding


class Step1XEdit(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        p = config.dit
        if config.connector.hidden_size != p.context_in_dim or config.connector.global_dim != p.vec_in_dim:
            raise ValueError(
                f"connector out ({config.connector.hidden_size}, {config.connector.global_dim}) != "
                f"DiT in (context_in_dim {p.context_in_dim}, vec_in_dim {p.vec_in_dim})"
            )
        self.params = p
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.connector = Qwen2Connector(config.connector, with_scale_factor=config.has_scale_factor)
        # v1.2: quoted characters' MLLM input embeddings, mapped and added to the connector's text tokens.
        rules = config.reason_edit
        self.text_token_mapping = nn.Linear(rules.token_mapping_in, rules.token_mapping_out) if rules else None

    def forward(
        self, img: Tensor, pe: Tensor, timestep: Tensor, llm_embedding: Tensor, llm_mask: Tensor,
        text_embeds: Tensor | None = None, text_mask: Tensor | None = None,
    ) -> Tensor:
        """img [B, N_img, 64] (noisy | reference tokens), pe [1, 1, L_txt + N_img, D/2, 2, 2],
        timestep [B] in [0, 1], llm_embedding [B, L_txt, C_llm], llm_mask [B, L_txt] -> [B, N_img, 64].
        v1.2 also takes text_embeds [B, L_txt, C_llm] (the MLLM's input embeddings) and text_mask [B, L_txt]."""
        txt, y = self.condition(llm_embedding, timestep, llm_mask, text_embeds, text_mask)
        return self.transformer(img, txt, y, timestep, pe)

    def condition(self, llm_embedding: Tensor, timestep: Tensor, llm_mask: Tensor, text_embeds: Tensor | None = None,
                  text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The connector (and v1.2's text-token mapping): (txt [B, L_txt, C], y [B, vec_in_dim])."""
        txt, y = self.connector(llm_embedding, timestep, llm_mask)
        if self.text_token_mapping is not None:
            if text_embeds is None or text_mask is None:
                raise ValueError("this DiT has a text-token mapping (v1.2): pass text_embeds and text_mask")
            txt = txt + self.text_token_mapping(text_embeds) * text_mask[..., None].to(txt.dtype)
        return txt, y

    def transformer(self, img: Tensor, txt: Tensor, y: Tensor, timestep: Tensor, pe: Tensor) -> Tensor:
        """The DiT after the connector (what diffusers' FluxTransformer2DModel computes)."""
        img, txt, vec = self.embed(img, txt, y, timestep)
        return self.final_layer(self.blocks(img, txt, vec, pe), vec)

    def embed(self, img: Tensor, txt: Tensor, y: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token embeddings and the modulation vector: (img, txt, vec) in hidden_size."""
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timestep * 1000, 256).to(img.dtype)) + self.vector_in(y)
        return img, self.txt_in(txt), vec

    def blocks(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, *, start: int = 0) -> Tensor:
        """Double blocks from `start`, then every single block -> the image tokens (step caching skips this)."""
        for block in self.double_blocks[start:]:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        # Attention is unmasked: padded text tokens take part; the final layer sees image tokens only.
        return x[:, txt.shape[1] :, ...]
