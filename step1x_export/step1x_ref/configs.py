"""Named configurations of Step1X-Edit: one registry of dataclass instances.

`v1.0`, `v1.1` and `v1.2` are the published models as upstream runs them now; `v1.0-first-release` is v1.0
as its first release ran it (for reproducing old results); `tiny` (v1.1 semantics), `tiny-v1.0` and
`tiny-v1.2` are small models with the same structure, used by the tests and the demo on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Version = Literal["v1.0", "v1.1", "v1.2"]
Resample = Literal["lanczos", "bicubic"]


@dataclass(frozen=True)
class DiTParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    theta: int
    qkv_bias: bool

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, expected head dim {head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dim}")


@dataclass(frozen=True)
class ConnectorParams:
    in_channels: int  # the MLLM's hidden size
    hidden_size: int
    num_heads: int
    depth: int
    global_dim: int  # = DiT vec_in_dim
    mlp_ratio: float = 4.0
    # The refiner's timestep embedding sees t * time_factor: 1000 in the model's description and upstream's current
    # (versioned) connector for both versions; the first v1.0 release passed t in [0, 1] unscaled.
    time_factor: float = 1000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"connector hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")


@dataclass(frozen=True)
class VAEParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float

    def __post_init__(self) -> None:
        if self.ch % 32:
            raise ValueError(f"VAE ch {self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")


@dataclass(frozen=True)
class EmbedderParams:
    """How the MLLM's hidden states become the DiT's conditioning (upstream `Qwen25VL_7b_Embedder`)."""

    hidden_size: int  # the MLLM's hidden size, = ConnectorParams.in_channels
    max_length: int  # tokens kept after the drop, zero-padded to this
    drop_tokens: int  # leading tokens (system turn + prompt prefix) dropped from the last hidden state
    min_pixels: int  # image processor bounds
    max_pixels: int
    quote_index: int = 155  # quotes after this character of the templated text are re-tokenised


@dataclass(frozen=True)
class ReasonEditParams:
    """What v1.2 (ReasonEdit) changes besides the embedder's numbers. Each published-pipeline rule
    that differs from v1.1's is a value here, defaulting to what v1.2 was released with."""

    # Linear(MLLM hidden -> connector hidden) on the MLLM's *input* embeddings of quoted characters,
    # added to the connector's output.
    token_mapping_in: int
    token_mapping_out: int
    # The published pipeline compares the scheduler's 0-1000 timestep with the CFG truncation 0.93, so
    # the norm rescale runs while sigma > 0.93 / 1000 (every step in practice); 1.0 compares sigma (v1.1).
    rescale_timestep_scale: float = 1000.0
    # Qwen's "!" has token id 0 and the published pipeline builds the mask as ids > 0, so "!" is treated
    # as padding when computing mRoPE positions (later tokens shift back by one; "!" itself gets position
    # 1, as transformers 4.x fills masked slots). False: every token is real.
    bang_is_padding: bool = True
    # The published embedder returns its embeddings in bf16 whatever the MLLM's dtype; False keeps them.
    bf16_embeddings: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: Version
    dit: DiTParams
    connector: ConnectorParams
    vae: VAEParams
    embedder: EmbedderParams
    # Only the tiny configs build their Qwen2.5-VL from code; real ones read the HF directory.
    tiny_qwen: dict | None = field(default=None, compare=False)
    reason_edit: ReasonEditParams | None = None  # v1.2 only
    default_steps: int = 28  # denoising steps of the published pipeline
    default_cfg: float = 6.0  # true-CFG guidance of the published pipeline
    # The CFG norm rescale applies while t > cfg_truncate: upstream's current inference.py passes 0.93 for
    # both versions; the first v1.0 release used 1.0 (never). v1.2's published pipeline compares a 0..1000
    # timestep with 0.93, so its threshold is 0.93 / 1000 on our 0..1 scale (set where v1.2 is built).
    cfg_truncate: float = 0.93
    # Filter of the input image's resize to the edit resolution: LANCZOS in upstream's current
    # inference.py, PIL's default BICUBIC in the first release.
    input_resample: Resample = "lanczos"

    @property
    def has_scale_factor(self) -> bool:
        return self.version == "v1.0"


_FLUX_VAE = VAEParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)

_FULL_DIT = DiTParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=(16, 56, 56),
    theta=10_000,
    qkv_bias=True,
)

_FULL_CONNECTOR = ConnectorParams(in_channels=3584, hidden_size=4096, num_heads=32, depth=2, global_dim=768)

_FULL_EMBEDDER = EmbedderParams(
    hidden_size=3584,
    max_length=640,
    drop_tokens=217,
    min_pixels=256 * 28 * 28,
    max_pixels=324 * 28 * 28,
)

_TINY_DIT = DiTParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=32,
    context_in_dim=64,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 12, 12),
    theta=10_000,
    qkv_bias=True,
)

_TINY_CONNECTOR = ConnectorParams(in_channels=64, hidden_size=64, num_heads=4, depth=2, global_dim=32)

_TINY_VAE = replace(_FLUX_VAE, ch=32)

# Tiny Qwen2.5-VL, built in code (see conditioner.tiny_qwen). drop_tokens is the number of tokens
# the tiny tokenizer gives the system turn + prefix, as 217 is for the real tokenizer.
_TINY_QWEN = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
    },
}

# drop_tokens: upstream's 217 drops the default system turn, the user header and the prompt prefix,
# i.e. every token before the image's "Picture 1: <|vision_start|>". The tiny tokenizer gives that same
# text ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + prefix)
# 286 tokens (checked by tests/test_conditioner.py).
_TINY_EMBEDDER = replace(_FULL_EMBEDDER, hidden_size=64, max_length=640, drop_tokens=286)


# v1.2: 90 leading tokens dropped (system turn + the edit prefix), up to 2048 kept, no padding; Qwen's
# pixel bounds 256..400 x 28^2. The tiny tokenizer gives that same head 222 tokens (tests/test_v1p2.py).
_V12_EMBEDDER = replace(_FULL_EMBEDDER, max_length=2048, drop_tokens=90, max_pixels=400 * 28 * 28)
_TINY_V12_EMBEDDER = replace(_V12_EMBEDDER, hidden_size=64, drop_tokens=222)
_V12 = ReasonEditParams(token_mapping_in=3584, token_mapping_out=4096)
_TINY_V12 = replace(_V12, token_mapping_in=64, token_mapping_out=64)
# `toy`: the same architecture at a size that trains on two CPU cores in under an hour (49 minutes on a Zen 5
# EPYC, 61 on a Zen 3 one: docs/toy.md) and really
# edits (step1x_export.toy), at size levels 64 to 160 and aspect ratios up to 2:1; by default at 160:
# 160 x 160 px, a 20 x 20 latent, 10 x 10 = 100 DiT image tokens. The
# autoencoder is 96 wide with no resnets in its encoder levels: its output norms have 32 groups, and at
# width 32 or 64 (1-2 channels a group) they normalise the colour of an image away (measured: flat
# colours decode to the same grey), so the width sets how much colour gets through. Its latent is
# trained normalised (scale 1, shift 0); the MLLM sees the image as 2 x 2 merged tokens (at most 16), and
# every instruction it is trained on fits, with them, in 64 kept tokens.
_TOY_DIT = replace(_TINY_DIT, hidden_size=96, num_heads=3, context_in_dim=96)
_TOY_CONNECTOR = ConnectorParams(in_channels=64, hidden_size=96, num_heads=2, depth=1, global_dim=32)
_TOY_VAE = replace(_FLUX_VAE, ch=96, ch_mult=(1, 1, 1, 1), num_res_blocks=0, scale_factor=1.0, shift_factor=0.0)
_TOY_EMBEDDER = replace(_TINY_EMBEDDER, max_length=64, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
# `toy-v1.2`: the toy's DiT, connector, autoencoder and MLLM under v1.2's rules (its prompt, its kept tokens,
# its positions, its text-token mapping into the toy's 96-wide connector output), the DiT fine-tuned from the
# toy's through that prompt path (`step1x_export.toy.v1p2_tune`).
_TOY_V12_EMBEDDER = replace(_TINY_V12_EMBEDDER, min_pixels=_TOY_EMBEDDER.min_pixels,
                            max_pixels=_TOY_EMBEDDER.max_pixels)
_TOY_V12 = replace(_V12, token_mapping_in=_TOY_CONNECTOR.in_channels, token_mapping_out=_TOY_CONNECTOR.hidden_size)


def _tiny(name: str, version: Version) -> ModelConfig:
    v12 = version == "v1.2"
    return ModelConfig(
        name=name,
        version=version,
        dit=_TINY_DIT,
        connector=_TINY_CONNECTOR,
        vae=_TINY_VAE,
        embedder=_TINY_V12_EMBEDDER if v12 else _TINY_EMBEDDER,
        tiny_qwen=_TINY_QWEN,
        reason_edit=_TINY_V12 if v12 else None,
        default_steps=50 if v12 else 28,
        cfg_truncate=0.93 / _TINY_V12.rescale_timestep_scale if v12 else 0.93,
    )


_V1_0 = ModelConfig("v1.0", "v1.0", _FULL_DIT, _FULL_CONNECTOR, _FLUX_VAE, _FULL_EMBEDDER)

CONFIGS: dict[str, ModelConfig] = {
    "v1.0": _V1_0,
    # The first release: no CFG rescale, BICUBIC input resize, the refiner's timestep unscaled (t in [0, 1]).
    "v1.0-first-release": replace(_V1_0, name="v1.0-first-release", cfg_truncate=1.0, input_resample="bicubic",
                                  connector=replace(_FULL_CONNECTOR, time_factor=1.0)),
    "v1.1": ModelConfig("v1.1", "v1.1", _FULL_DIT, _FULL_CONNECTOR, _FLUX_VAE, _FULL_EMBEDDER),
    "v1.2": ModelConfig("v1.2", "v1.2", _FULL_DIT, _FULL_CONNECTOR, _FLUX_VAE, _V12_EMBEDDER,
                        reason_edit=_V12, default_steps=50, cfg_truncate=0.93 / _V12.rescale_timestep_scale),
    "tiny": _tiny("tiny", "v1.1"),
    "tiny-v1.0": _tiny("tiny-v1.0", "v1.0"),
    "tiny-v1.2": _tiny("tiny-v1.2", "v1.2"),
    # Chosen on training photos, never the held-out ones: centre crops of the 8 colour training photos at 64x64,
    # 128x128 and 192x128, mean task PSNR over the 7 tasks (the shipped weights, 28 steps, seed 0): cfg 1.0
    # 25.49, 1.25 25.80, 1.5 25.80, 1.75 25.69, 2.0 25.56 dB; 1.25 leads 1.5 by 0.006 dB there and by 0.034 over
    # the five evaluated shapes (benchmarks/toy_guidance.py). Guidance past 1.5 over-shoots the colour edits of a
    # model this small; none (1.0) loses 0.2-0.5 dB.
    "toy": ModelConfig("toy", "v1.1", _TOY_DIT, _TOY_CONNECTOR, _TOY_VAE, _TOY_EMBEDDER, tiny_qwen=_TINY_QWEN,
                       default_cfg=1.25),
    # Chosen as the toy's was, on training photos (centre crops of the 8 colour training photos at 64x64 and
    # 128x128, mean task PSNR over the 7 tasks, the shipped weights, seed 0; `benchmarks/toy_guidance.py --model
    # toy-v1.2`): cfg 1.0 18.91, 1.25 20.43, 1.5 21.66, 2.0 22.84, 2.5 23.01, 3.0 22.86, 4.0 22.44, 6.0 21.67 dB.
    # Guidance helps it more than the toy (why is not measured: it edits less than the toy it learned from, and
    # v1.2 rescales the guided prediction to the conditional one's norm on every step). 50 steps (v1.2's published
    # default) scored 20.37 dB against 28 steps' 20.43 at cfg 1.25: 28, the toy's, for 44% less time.
    "toy-v1.2": ModelConfig("toy-v1.2", "v1.2", _TOY_DIT, _TOY_CONNECTOR, _TOY_VAE, _TOY_V12_EMBEDDER,
                            tiny_qwen=_TINY_QWEN, reason_edit=_TOY_V12, default_steps=28, default_cfg=2.5,
                            cfg_truncate=0.93 / _TOY_V12.rescale_timestep_scale),
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}") from None
