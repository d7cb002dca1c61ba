"""Each component as (torch module, example inputs) ready for the exporter, built from a pipeline.

Example inputs only fix the graph's structure: every spec dim named as dynamic stays symbolic. They
use batch 2 and sizes other than 0/1, which torch.export would otherwise specialise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..precision import Precision
from ..step1x_ref.dit.math import rope_table
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.sampling import position_ids
from ..step1x_ref.vae.autoencoder import VAEDecoder, VAEEncoder
from ..step1x_ref.versions import edit_version
from .qwen import LLMExport, VisionExport, llm_position_ids, vision_inputs

EXAMPLE_INSTRUCTION = 'Replace the text "OPEN" with "CLOSED" and make the sky purple'


@dataclass
class ExportUnit:
    module: nn.Module  # in the graph's precision, eval mode
    source: nn.Module  # the module as given (hashed into the manifest)
    args: tuple[torch.Tensor, ...]
    precision: Precision  # what the graph computes in (the VAE stays fp32, as upstream runs it)


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` in `dtype`; a copy if it is in another dtype (the pipeline's model is left untouched)."""
    current = next(module.parameters()).dtype
    return module if current == dtype else copy.deepcopy(module).to(dtype)


def example_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mllm_examples(pipe: Step1XEditPipeline, dtype: torch.dtype) -> tuple[dict, dict]:
    """Vision and LLM example inputs from the real preprocessing of one image and two instructions."""
    emb, image = pipe.embedder, example_image()
    cond, uncond = emb.prepare(EXAMPLE_INSTRUCTION, image), emb.prepare("", image)
    host = vision_inputs(cond.image_grid_thw, emb.model.config.vision_config)
    vision = {"pixel_values": cond.pixel_values.to(dtype)} | host
    with torch.inference_mode():
        image_embeds = emb.encode_image(cond.pixel_values, cond.image_grid_thw).to(dtype)
    ids, mask = pad_batch([cond.input_ids[0], uncond.input_ids[0]], [cond.attention_mask[0], uncond.attention_mask[0]])
    llm = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": llm_position_ids(ids, mask, cond.image_grid_thw, emb.model.config),
        "image_embeds": image_embeds.detach().clone(),
    }
    return vision, llm


def pad_batch(ids: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to one length (mask 0 on padding): with a causal mask, padding at the end
    changes nothing before it, so each row's hidden states equal an unpadded batch-1 run."""
    length = max(len(i) for i in ids)
    out_ids = torch.zeros(len(ids), length, dtype=torch.long)
    out_mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, (i, m) in enumerate(zip(ids, masks, strict=True)):
        out_ids[row, : len(i)], out_mask[row, : len(m)] = i, m
    return out_ids, out_mask


def build_units(pipe: Step1XEditPipeline, names: list[str], precision: Precision) -> dict[str, ExportUnit]:
    """The export module and example inputs of each requested component."""
    dtype = precision.compute_dtype
    cfg = pipe.config
    units: dict[str, ExportUnit] = {}
    if {"vision", "llm"} & set(names):
        vision_args, llm_args = _mllm_examples(pipe, dtype)
        hf = pipe.embedder.model
        if "vision" in names:
            source = VisionExport(hf.model.visual)
            units["vision"] = ExportUnit(
                VisionExport(_cast(hf.model.visual, dtype)).eval(), source, tuple(vision_args.values()), precision
            )
        if "llm" in names:
            lm, token = hf.model.language_model, hf.config.image_token_id
            units["llm"] = ExportUnit(
                LLMExport(_cast(lm, dtype), token).eval(), LLMExport(lm, token), tuple(llm_args.values()), precision
            )
    if "dit" in names:
        n_h, n_w = 2, 3
        p = cfg.dit
        version = edit_version(cfg)
        txt = 9 if version.trimmed_text else cfg.embedder.max_length  # a dynamic text axis, or padded
        n = n_h * n_w
        args = (
            torch.randn(2, 2 * n, p.in_channels, dtype=dtype),
            rope_table(position_ids(txt, n_h, n_w, cfg.version), p.axes_dim, p.theta),
            torch.tensor([0.9, 0.9], dtype=dtype),
            torch.randn(2, txt, cfg.embedder.hidden_size, dtype=dtype),
            (torch.arange(txt) < 7).long().expand(2, -1).contiguous(),
        )
        if "text_embeds" in version.dit_inputs:  # the MLLM's input embeddings and the quoted-character mask
            args += (torch.randn(2, txt, cfg.embedder.hidden_size, dtype=dtype),
                     (torch.arange(txt) % 3 == 1).long().expand(2, -1).contiguous())
        units["dit"] = ExportUnit(_cast(pipe.model, dtype).eval(), pipe.model, args, precision)
    fp32 = Precision.FP32
    if "vae_encoder" in names:
        enc = VAEEncoder(pipe.ae)
        image = torch.rand(2, 3, 48, 64) * 2 - 1
        units["vae_encoder"] = ExportUnit(_cast(enc, torch.float32).eval(), enc, (image,), fp32)
    if "vae_decoder" in names:
        dec = VAEDecoder(pipe.ae)
        z = cfg.vae.z_channels
        units["vae_decoder"] = ExportUnit(_cast(dec, torch.float32).eval(), dec, (torch.randn(2, z, 6, 8),), fp32)
    return units
