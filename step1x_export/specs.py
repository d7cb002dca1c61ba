"""Each component's I/O, declared once: names, dtypes, dynamic dims and min/opt/max shapes.

Export (input/output names, dynamic axes), engine building (optimization profiles), the
runtime (buffer plan, profile checks) and the tests all read these objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from .choices import COMPONENTS  # noqa: F401  (the exported graphs, named here for their users)
from .step1x_ref.configs import ModelConfig
from .step1x_ref.imaging import edit_size
from .step1x_ref.profiles import Profile, profile_for
from .step1x_ref.versions import edit_version

# "compute" follows the graph's precision (fp32 / bf16 / fp16); the others are fixed.
DType = Literal["compute", "float32", "int64"]
Dim = int | str  # an int is static, a str names a dynamic dim resolved from `DimRanges`
_FIXED_DTYPES = {"float32": torch.float32, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    dims: tuple[Dim, ...]

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.dims)

    def torch_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The tensor's torch dtype when the graph computes in `compute`."""
        return _FIXED_DTYPES.get(self.dtype, compute)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dim_names(self) -> set[str]:
        """Every dynamic dim any input or output uses."""
        return {d for t in (*self.inputs, *self.outputs) for d in t.dims if isinstance(d, str)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx-style {tensor: {axis: dim name}} for every dynamic dim."""
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.dims)
        }

    def check_inputs(self, names: Iterable[str]) -> None:
        """Raise ValueError naming the component and every input the call lacks."""
        missing = set(self.input_names) - set(names)
        if missing:
            raise ValueError(f"{self.name}: missing inputs {sorted(missing)}; expected {self.input_names}")

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}; it has {self.input_names + self.output_names}")


# Optional shape buckets (RuntimeOptions.shape_buckets): the aspect ratios (width / height) an edit may be
# snapped to, so a server sees a few shapes (few CUDA graphs, each a static shape) instead of one per input
# aspect. Off by default: snapping changes the pixels the model sees, relative to upstream's resize rule.
BUCKET_ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)


def shape_bucket(width: int, height: int, size_level: int) -> tuple[int, int]:
    """The bucket size for a width x height input at `size_level`: the bucket aspect nearest to the input's
    (in log ratio), sized by the same rule as any edit (`edit_size`)."""
    import math

    aspect = min(BUCKET_ASPECTS, key=lambda r: abs(math.log(r) - math.log(width / height)))
    return edit_size(round(10_000 * aspect), 10_000, size_level)


DimRanges = dict[str, tuple[int, int, int]]  # dim name -> (min, opt, max)


# Qwen2.5-VL's vision tower: 2x2 patches merge into one LLM token; a patch is 3 ch x 2 frames x 14 x 14.
VISION_MERGE_UNIT = 4
VISION_PATCH_DIM = 3 * 2 * 14 * 14
VISION_TOKEN_PIXELS = 28 * 28
# Template tokens around the image and instruction that are not part of drop_tokens ("Picture 1: ",
# vision start/end, "<|im_end|>\n<|im_start|>assistant\n"): a generous bound.
LLM_TEMPLATE_TAIL = 16


def vision_token_range(config: ModelConfig) -> tuple[int, int]:
    """Merged image tokens the processor produces: its min/max_pixels bounds over 28x28 pixels per token."""
    e = config.embedder
    return e.min_pixels // VISION_TOKEN_PIXELS, e.max_pixels // VISION_TOKEN_PIXELS


def dim_ranges(config: ModelConfig, profile: Profile | None = None) -> DimRanges:
    """min/opt/max of every dynamic dim of every component's graph for `profile`.

    The MLLM dims do not depend on the edit resolution: the processor resizes the image to
    min_pixels..max_pixels whatever size_level is.
    """
    profile = profile or profile_for(config)
    ow, oh = profile.opt_size()
    sizes = [*profile.edit_sizes(profile.min_level), *profile.edit_sizes(profile.max_level), (ow, oh)]
    sides = [s for size in sizes for s in size]
    tokens = [(w // 16) * (h // 16) for w, h in sizes]
    n_min, n_opt, n_max = min(tokens), (ow // 16) * (oh // 16), max(tokens)
    txt = config.embedder.max_length
    merge = VISION_MERGE_UNIT
    t_min, t_max = vision_token_range(config)
    t_opt = t_max  # a typical edit image fills the processor's max_pixels
    llm_fixed = config.embedder.drop_tokens + LLM_TEMPLATE_TAIL
    txt_min, txt_opt = text_length_range(config)
    return {
        "txt_len": (txt_min, txt_opt, txt),
        "batch": (1, 2, 2),
        "vis_tokens": (t_min, t_opt, t_max),
        "vis_patches": (merge * t_min, merge * t_opt, merge * t_max),
        # prefix + image + instruction: short instructions at min, up to max_length instruction tokens at max
        "llm_seq": (llm_fixed + t_min, llm_fixed + t_opt + 32, llm_fixed + t_max + txt),
        # noisy + reference tokens of an edit; text-to-image has no reference: its minimum is n_min
        "img_tokens": (n_min, 2 * n_opt, 2 * n_max),
        "seq_len": (txt_min + n_min, txt_opt + 2 * n_opt, txt + 2 * n_max),
        "height": (min(sides), oh, max(sides)),
        "width": (min(sides), ow, max(sides)),
        "lat_h": (min(sides) // 8, oh // 8, max(sides) // 8),
        "lat_w": (min(sides) // 8, ow // 8, max(sides) // 8),
    }


def text_length_range(config: ModelConfig) -> tuple[int, int]:
    """(min, opt) text tokens the DiT reads; max is `max_length`. Static (padded) before v1.2.

    v1.2 trims the padding, so the length varies per edit: at least the image tokens at the processor's
    min_pixels (the empty negative prompt keeps little else), typically max_pixels' image plus an instruction.
    """
    if not edit_version(config).trimmed_text:
        return config.embedder.max_length, config.embedder.max_length
    t_min, t_max = vision_token_range(config)
    return t_min, min(t_max + 64, config.embedder.max_length)


def text_dim(config: ModelConfig) -> Dim:
    """The DiT's text axis: dynamic ("txt_len") where the length varies per edit (v1.2), else static.

    Dynamic, not bucketed: the exported DiT's joint attention has no mask, so padding to a bucket would change
    every output; one graph with a dynamic axis stays exact (TensorRT: one profile min..max). The torch
    runtime's one CFG call (`RuntimeOptions.text_bucket`) pads and masks the keys around the call."""
    return "txt_len" if edit_version(config).trimmed_text else config.embedder.max_length


def dit_spec(config: ModelConfig) -> ComponentSpec:
    """Connector + DiT, one denoising step: the connector depends on t, so it runs inside the step.

    v1.2 adds the MLLM's input embeddings and the quoted-character mask (its text-token mapping)."""
    p, txt, hidden = config.dit, text_dim(config), config.embedder.hidden_size
    text_tokens = (TensorSpec("text_embeds", "compute", ("batch", txt, hidden)),
                   TensorSpec("text_mask", "int64", ("batch", txt)))
    taken = edit_version(config).dit_inputs  # the version's conditioning, by name
    return ComponentSpec(
        name="dit",
        inputs=(
            TensorSpec("img", "compute", ("batch", "img_tokens", p.in_channels)),
            TensorSpec("pe", "float32", (1, 1, "seq_len", p.hidden_size // p.num_heads // 2, 2, 2)),
            TensorSpec("timestep", "compute", ("batch",)),
            TensorSpec("llm_embedding", "compute", ("batch", txt, hidden)),
            TensorSpec("llm_mask", "int64", ("batch", txt)),
            *(spec for spec in text_tokens if spec.name in taken),
        ),
        outputs=(TensorSpec("pred", "compute", ("batch", "img_tokens", p.out_channels)),),
    )


def vae_encoder_spec(config: ModelConfig) -> ComponentSpec:
    z = config.vae.z_channels
    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        outputs=(TensorSpec("latent", "float32", ("batch", z, "lat_h", "lat_w")),),
    )


def vae_decoder_spec(config: ModelConfig) -> ComponentSpec:
    z = config.vae.z_channels
    return ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", z, "lat_h", "lat_w")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
    )


def vision_spec(config: ModelConfig) -> ComponentSpec:
    """Qwen2.5-VL vision tower (patch embed, windowed/full blocks, merger) for ONE image.

    Window attention's indices depend on the image grid (host loops in transformers), so the runtime
    computes them (`export.qwen.vision_inputs`) and the graph takes them as data: HF's rotary position
    ids, the window permutation (merged-token level) and its inverse, and each patch's window number
    (in window order; equal numbers attend to each other in the windowed blocks).
    """
    return ComponentSpec(
        name="vision",
        inputs=(
            TensorSpec("pixel_values", "compute", ("vis_patches", VISION_PATCH_DIM)),
            TensorSpec("position_ids", "int64", ("vis_patches", 2)),
            TensorSpec("window_index", "int64", ("vis_tokens",)),
            TensorSpec("reverse_index", "int64", ("vis_tokens",)),
            TensorSpec("window_id", "int64", ("vis_patches",)),
        ),
        outputs=(TensorSpec("image_embeds", "compute", ("vis_tokens", config.embedder.hidden_size)),),
    )


def llm_spec(config: ModelConfig) -> ComponentSpec:
    """Qwen2.5-VL language model prefill to the last hidden state (after the final norm), no KV cache.

    Token ids enter (the embedding table stays in the graph); image embeddings fill the image-pad slots
    in order, the same features for every batch row (cond and uncond share the image). position_ids are
    the 3-D mRoPE ids [3, B, S] from HF's `get_rope_index`, computed on the host; attention_mask [B, S]
    is 1 on attended tokens (ids > 0, upstream) and 0 on padding; the graph adds the causal mask.
    """
    return ComponentSpec(
        name="llm",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "llm_seq")),
            TensorSpec("attention_mask", "int64", ("batch", "llm_seq")),
            TensorSpec("position_ids", "int64", (3, "batch", "llm_seq")),
            TensorSpec("image_embeds", "compute", ("vis_tokens", config.embedder.hidden_size)),
        ),
        outputs=(TensorSpec("last_hidden_state", "compute", ("batch", "llm_seq", config.embedder.hidden_size)),),
    )




def component_specs(config: ModelConfig) -> dict[str, ComponentSpec]:
    """Every exportable component's spec, in pipeline order."""
    return {
        "vision": vision_spec(config),
        "llm": llm_spec(config),
        "dit": dit_spec(config),
        "vae_encoder": vae_encoder_spec(config),
        "vae_decoder": vae_decoder_spec(config),
    }
