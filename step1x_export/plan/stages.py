"""Each stage of an edit built on `meta` from the real configs, with meta inputs of an edit's shapes.

The modules are the ones the torch runtime runs, quantized as a configuration asks (8-bit modules
swapped in on meta, their GPU kernels forced, so the trace sees the kernels' temporaries, not the CPU
emulation's). The MLLM is traced through the export graphs' modules (`VisionExport`, `LLMExport`):
the same weights and maths as transformers' forward, without its host-side index loops, which
meta tensors cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..calibrate.formats import QuantFormat
from ..calibrate.qcheckpoint import WEIGHT_ONLY_DEFAULT, QuantizedLayout, swap_on_meta
from ..calibrate.qlinear import Kernel, QuantLinear
from ..calibrate.recipes import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, get_recipe, select_layers
from ..runtime.engines.buffers import edit_dims
from ..runtime.engines.mllm import MLLM_WEIGHT_ONLY, drop_lm_head
from ..specs import ComponentSpec, dim_ranges, dit_spec, llm_spec, vae_decoder_spec, vae_encoder_spec, vision_spec
from ..step1x_ref.configs import ModelConfig
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.vae.autoencoder import AutoEncoder, VAEDecoder, VAEEncoder

# Qwen2.5-VL-7B-Instruct's config.json (the architecture fields; token ids as the official file has them).
QWEN25_VL_7B = {
    "text_config": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 128000, "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


@dataclass
class StageModel:
    name: str
    module: nn.Module  # on meta; what the stage holds on the device
    passes: list[tuple[Callable[..., Tensor], list[Tensor]]]  # the forwards one edit runs, with their inputs

    @property
    def inputs(self) -> list[Tensor]:
        return [t for _, inputs in self.passes for t in inputs]


def meta_inputs(spec: ComponentSpec, dims: dict[str, int], dtype: torch.dtype) -> list[Tensor]:
    return [torch.empty(t.shape(dims), dtype=t.torch_dtype(dtype), device="meta") for t in spec.inputs]


def dit_layout(model: nn.Module, quant: str | None, weight_only: QuantFormat | None) -> QuantizedLayout:
    """The default selection of `quant`'s recipe (W8A8, per-channel) plus the weight-only modulation and
    connector Linears (`WEIGHT_ONLY_DEFAULT`)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    w8a8, fmt = {}, None
    if quant is not None:
        recipe = get_recipe(quant)
        fmt = recipe.fmt
        for n in select_layers(linears, DEFAULT_INCLUDE, DEFAULT_EXCLUDE):
            m = model.get_submodule(n)
            w8a8[n] = {"in_features": m.in_features, "out_features": m.out_features, "per_channel": True,
                       "smooth": recipe.smooth}
    wo = tuple(n for n in select_layers(linears, WEIGHT_ONLY_DEFAULT, ()) if n not in w8a8) if weight_only else ()
    return QuantizedLayout(w8a8, fmt, wo, weight_only if wo else None)


def dit_stage(config: ModelConfig, dims: dict[str, int], dtype: torch.dtype, quant: str | None,
              weight_only: QuantFormat | None) -> StageModel:
    with torch.device("meta"):
        model = Step1XEdit(config).to(dtype)
    swap_on_meta(model, dit_layout(model, quant, weight_only), dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear):  # the GPU kernel's temporaries, not the CPU emulation's
            m.use_kernel(Kernel.SCALED_MM if m.fmt is QuantFormat.FP8_E4M3 else Kernel.INT_MM)
    return StageModel("dit", model, [(model, meta_inputs(dit_spec(config), dims, dtype))])


def vae_stages(config: ModelConfig, dims: dict[str, int]) -> tuple[StageModel, StageModel]:
    with torch.device("meta"):
        ae = AutoEncoder(config.vae)
    enc, dec = VAEEncoder(ae), VAEDecoder(ae)
    one = dict(dims, batch=1)
    return (StageModel("vae_encoder", enc, [(enc, meta_inputs(vae_encoder_spec(config), one, torch.float32))]),
            StageModel("vae_decoder", dec, [(dec, meta_inputs(vae_decoder_spec(config), one, torch.float32))]))


def qwen_config(config: ModelConfig):
    from transformers import Qwen2_5_VLConfig

    if config.tiny_qwen is not None:
        from ..step1x_ref.mllm.tiny_qwen import build_tiny_processor, tiny_qwen_config

        e = config.embedder
        return tiny_qwen_config(config.tiny_qwen, build_tiny_processor(e.min_pixels, e.max_pixels).tokenizer)
    return Qwen2_5_VLConfig(**QWEN25_VL_7B)


_QWEN_MODELS: dict[tuple, nn.Module] = {}


def qwen_model(config: ModelConfig, dtype: torch.dtype, quant: QuantFormat | None) -> nn.Module:
    """Qwen2.5-VL on meta as the runtime keeps it (LM head dropped), built once per process: every real
    version shares Qwen2.5-VL-7B, whose meta build takes seconds. Never changed after it is built."""
    key = (None if config.tiny_qwen is None else config.name, dtype, quant)
    if key not in _QWEN_MODELS:
        from transformers import Qwen2_5_VLForConditionalGeneration

        qcfg = qwen_config(config)
        qcfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(qcfg).to(dtype)
        drop_lm_head(model)
        if quant is not None:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            # Empty 8-bit modules, as the DiT's: quantizing meta weights would only run the maths on shapes.
            swap_on_meta(model, QuantizedLayout({}, None, tuple(select_layers(linears, MLLM_WEIGHT_ONLY, ())), quant),
                         dtype)
        _QWEN_MODELS[key] = model
    return _QWEN_MODELS[key]


def mllm_stage(config: ModelConfig, dtype: torch.dtype, quant: QuantFormat | None) -> StageModel:
    """Qwen2.5-VL as the runtime keeps it (LM head dropped; Linears weight-only 8-bit with `quant`).

    One vision pass, then one LLM pass per prompt (cond, uncond), each at the longest sequence the
    specs allow (an instruction filling max_length).
    """
    from ..export.qwen import LLMExport, VisionExport

    model = qwen_model(config, dtype, quant)
    qcfg = model.config
    ranges = dim_ranges(config)
    dims = {k: v[2] for k, v in ranges.items()} | {"batch": 1}
    vision, llm = VisionExport(model.model.visual), LLMExport(model.model.language_model, qcfg.image_token_id)
    return StageModel("mllm", model, [(vision, meta_inputs(vision_spec(config), dims, dtype)),
                                      (llm, meta_inputs(llm_spec(config), dims, dtype))])


STAGES = ("mllm", "vae_encoder", "dit", "vae_decoder")  # run order


def build_stage(name: str, config: ModelConfig, width: int, height: int, *, dtype: torch.dtype, quant: str | None,
                weight_only: QuantFormat | None, mllm_quant: QuantFormat | None, batch: int = 2) -> StageModel:
    """One stage on meta: mllm, vae_encoder, dit (`batch` rows: 2 per edit, true CFG) or vae_decoder."""
    dims = edit_dims(config, width, height, batch=batch)
    if name == "mllm":
        return mllm_stage(config, dtype, mllm_quant)
    if name == "dit":
        return dit_stage(config, dims, dtype, quant, weight_only)
    if name in ("vae_encoder", "vae_decoder"):
        return vae_stages(config, dims)[name == "vae_decoder"]
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
