"""Export views of Qwen2.5-VL: the vision tower and the LLM prefill as static-shape-friendly modules.

transformers runs window attention by splitting the sequence with `cu_seqlens.tolist()` and builds
the window permutation with host loops over `grid_thw`: neither traces into a graph with dynamic
shapes. These views run the SAME HF submodules (so parameter names, and the weights, are HF's) with
everything data-dependent computed on the host by `vision_inputs` / `llm_position_ids` (reusing
transformers' own helpers) and passed in as tensors:

- windows become a per-patch window number; the windowed blocks attend where numbers match (a
  block-diagonal mask), the full-attention blocks attend everywhere (one image per call);
- image features enter the LLM by a cumsum-gather into the image-pad slots (no `masked_scatter`,
  whose output shape ONNX cannot express), the causal + padding mask is built in the graph.

Parameter names equal `model.model.visual.*` and `model.model.language_model.*` of
`Qwen2_5_VLForConditionalGeneration` without those prefixes.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLModel,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index


class VisionExport(nn.Module):
    """HF `Qwen2_5_VisionTransformerPretrainedModel` forward for one image, window indices as inputs."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        cfg = visual.config
        # Same attribute names as the HF module, so initializer names match its state dict.
        self.patch_embed, self.blocks, self.merger = visual.patch_embed, visual.blocks, visual.merger
        self.rotary_pos_emb = visual.rotary_pos_emb
        self.full_blocks = frozenset(cfg.fullatt_block_indexes)
        self.num_heads, self.unit = cfg.num_heads, cfg.spatial_merge_size**2

    def forward(
        self, pixel_values: Tensor, position_ids: Tensor, window_index: Tensor, reverse_index: Tensor, window_id: Tensor
    ) -> Tensor:
        x = self.patch_embed(pixel_values)
        x = self._to_windows(x, window_index)
        cos, sin = self.rotary_pos_emb(x, position_ids)
        cos, sin = self._to_windows(cos, window_index), self._to_windows(sin, window_index)
        window_mask = window_id[:, None] == window_id[None, :]
        for i, block in enumerate(self.blocks):
            x = self._block(block, x, cos, sin, None if i in self.full_blocks else window_mask)
        return self.merger(x)[reverse_index]

    def _to_windows(self, x: Tensor, window_index: Tensor) -> Tensor:
        """Permute patches into window order, whole 2x2 merge units at a time (HF `permute_input_for_window_attn`)."""
        return x.reshape(-1, self.unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

    def _block(self, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
        return x + block.mlp(block.norm2(x))

    def _attention(self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


def vision_inputs(grid_thw: Tensor, vision_config) -> dict[str, Tensor]:
    """Host-side inputs of the vision graph for one image grid [1, 3] (transformers' own index helpers)."""
    if grid_thw.shape != (1, 3):
        raise ValueError(f"vision graph takes one image: grid_thw must be [1, 3], got {tuple(grid_thw.shape)}")
    merge = vision_config.spatial_merge_size
    grid_thw = grid_thw.cpu()
    position_ids = get_vision_position_ids(grid_thw, merge)
    window_index, cu_window = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=vision_config.window_size, patch_size=vision_config.patch_size
    )
    lengths = (cu_window[1:] - cu_window[:-1]).long()
    window_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return {
        "position_ids": position_ids.long(),
        "window_index": window_index.long(),
        "reverse_index": torch.argsort(window_index).long(),
        "window_id": window_id,
    }


class LLMExport(nn.Module):
    """HF `Qwen2_5_VLTextModel` prefill (no cache) with image features merged in the graph."""

    def __init__(self, language_model: nn.Module, image_token_id: int):
        super().__init__()
        self.embed_tokens, self.layers = language_model.embed_tokens, language_model.layers
        self.norm = language_model.norm
        self.rotary_emb = language_model.rotary_emb
        self.image_token_id = image_token_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, image_embeds: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        is_image = (input_ids == self.image_token_id).unsqueeze(-1)
        # The k-th image-pad token of each row takes image feature k (what masked_scatter does per row).
        slot = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(min=0).squeeze(-1)
        x = torch.where(is_image, image_embeds.to(x.dtype)[slot], x)
        mask = self._mask(attention_mask, x.dtype)
        cos_sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=cos_sin)
        return self.norm(x)

    @staticmethod
    def _mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive [B, 1, S, S]: key j is seen by query i iff j <= i and attention_mask[j] (HF's causal mask)."""
        s = attention_mask.shape[1]
        pos = torch.arange(s, device=attention_mask.device)
        allowed = (pos[None, :] <= pos[:, None])[None] & attention_mask.bool()[:, None, :]
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


def llm_position_ids(input_ids: Tensor, attention_mask: Tensor, image_grid_thw: Tensor, qwen_config) -> Tensor:
    """3-D mRoPE ids [3, B, S] by transformers' `get_rope_index` (it needs the config only, no weights)."""
    shim = types.SimpleNamespace(config=qwen_config)
    shim.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, shim)
    positions, _ = Qwen2_5_VLModel.get_rope_index(
        shim,
        input_ids,
        mm_token_type_ids=(input_ids == qwen_config.image_token_id).int(),
        image_grid_thw=image_grid_thw.repeat(input_ids.shape[0], 1),
        attention_mask=attention_mask,
    )
    return positions
