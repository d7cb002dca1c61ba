"""The MLLM stage's memory: the unused LM head dropped, optionally 8-bit weight-only Linears.

The embedder reads Qwen2.5-VL's last hidden state; the LM head (152,064 x 3,584: 1.09 GB in bf16 for
the 7B model) never runs, so it is not kept. With `quant`, every Linear of the vision tower, its merger
and the language model's decoder layers becomes a `WeightOnlyLinear` (8-bit weight, per-channel scale,
bf16 compute); the token embedding table and the norms stay as loaded. Quantize on the host before
moving to the device: the bf16 copy of the quantized layers never reaches the GPU. `quant="int4"` stores
them group-wise in 4 bits instead (`calibrate.int4`; a layer whose width no group divides stays int8): text
generation's one- and two-row GEMMs read the codes with torch's W4A16 kernel, the prompt's GEMMs dequantize
each layer into the compute dtype first.
"""

from __future__ import annotations

from torch import nn

from ...calibrate.int4 import int4_group, quantize_int4_
from ...calibrate.recipes import select_layers
from ...calibrate.weight_only import WEIGHT_ONLY_FORMATS, parse_weight_only, quantize_weights_
from ...step1x_ref.mllm.conditioner import Qwen25VLEmbedder

MLLM_QUANT_FORMATS = (*WEIGHT_ONLY_FORMATS, "int4")  # what `prepare_mllm` takes as `quant`
MLLM_WEIGHT_ONLY = ("model.visual.blocks.*", "model.visual.merger.*", "model.language_model.layers.*")


def drop_lm_head(model: nn.Module) -> nn.Module:
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = nn.Identity()  # logits are never computed: the embedder stops at the last hidden state
    return model


def prepare_mllm(embedder: Qwen25VLEmbedder, quant: str | None) -> Qwen25VLEmbedder:
    """Drop the LM head and, with `quant` ("fp8" / "int8" / "int4"), make the Linears weight-only (in place)."""
    fmt = None if quant == "int4" else parse_weight_only(quant, "mllm_quant")
    model = drop_lm_head(embedder.model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if quant == "int4":  # a layer no 4-bit group divides stays 8-bit (the vision MLP's 3420-wide down projections)
        chosen = select_layers(linears, MLLM_WEIGHT_ONLY, ())
        four = [n for n in chosen if int4_group(model.get_submodule(n).in_features) is not None]
        quantize_int4_(model, four, clip_search=True, w4a16=True)
        quantize_weights_(model, [n for n in chosen if n not in four], parse_weight_only("int8", "mllm_quant"))
    elif fmt is not None:
        quantize_weights_(model, select_layers(linears, MLLM_WEIGHT_ONLY, ()), fmt)
    return embedder
