"""Models and inputs for latency runs: seeded random weights, built directly on the target device.

Latency does not depend on the weights' values as long as activations stay finite and O(1)
(all-zero or inf/NaN activations make GEMMs run faster than real data would), so every run
checks and reports that (`activation_check`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..choices import TEXT_BUCKET
from ..step1x_ref.configs import ModelConfig, get_config
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.mllm.conditioner import MLLMInputs, Qwen25VLEmbedder, select_tokens
from ..step1x_ref.mllm.conditioner_v1p2 import V12Text
from ..step1x_ref.pipeline import sampling_inputs
from ..step1x_ref.sampling import StepFn, pack
from ..step1x_ref.vae.autoencoder import AutoEncoder
from ..step1x_ref.versions import edit_version
from ..step1x_ref.versions.v1p2 import branch_conditioning
from ..step1x_ref.versions.v1p2_joint import masked_step
from ..step1x_ref.weights.random_weights import randomize_

# Qwen2.5-VL-7B-Instruct's published config.json, set explicitly (transformers' defaults drift between versions).
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "in_channels": 3,
}
QWEN25_VL_7B_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                    "vision_end_token_id": 151653}

# What the real embedder sees: 324 merged image tokens at the processor's max_pixels (a 36x36 patch grid
# after the 2x2 merge -> grid_thw (1, 36, 36)), 626 tokens in all for a short instruction.
MLLM_GRID_THW = (1, 36, 36)
MLLM_SEQ_LEN = 626


@dataclass
class BenchModels:
    """The pieces a latency run needs. `mllm` is None when the MLLM stage is not built (it costs memory)."""

    config: ModelConfig
    dit: Step1XEdit
    ae: AutoEncoder | None
    mllm: Qwen25VLEmbedder | None
    device: torch.device
    dtype: torch.dtype  # DiT / MLLM dtype
    vae_dtype: torch.dtype


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def randomize_on_device_(module: nn.Module, seed: int = 0) -> nn.Module:
    """`randomize_`'s distributions drawn on the parameters' own device (seconds for 12 B weights on a GPU).

    Weights ~ U(+-1/sqrt(fan_in)), 1-D norm scales ~ 1 + 0.1 N, other 1-D parameters ~ 0.02 N.
    """
    first = next(module.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2:
            bound = 1 / math.sqrt(p[0].numel())
            p.uniform_(-bound, bound, generator=gen)
        elif leaf in ("scale", "weight"):
            p.normal_(1.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return module


def build_dit(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Step1XEdit:
    """The DiT (+connector) with random weights, allocated directly on `device` in `dtype`."""
    if device.type == "cpu" and config.tiny_qwen is not None:
        # The tests' weights: same values as Step1XEditPipeline.random on CPU.
        return randomize_(Step1XEdit(config), seed).to(dtype).eval().requires_grad_(False)
    with torch.device(device), default_dtype(dtype):
        model = Step1XEdit(config)
    return randomize_on_device_(model, seed).eval().requires_grad_(False)


def build_vae(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 1) -> AutoEncoder:
    with torch.device(device), default_dtype(dtype):
        ae = AutoEncoder(config.vae)
    return randomize_on_device_(ae, seed).eval().requires_grad_(False)


def qwen25_vl_7b_config():
    """Qwen2.5-VL-7B's architecture, built in code (no download): checked against the published numbers."""
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(text_config=dict(QWEN25_VL_7B_TEXT), vision_config=dict(QWEN25_VL_7B_VISION),
                           **QWEN25_VL_7B_IDS)
    text, vision = cfg.text_config, cfg.vision_config
    got = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
           text.intermediate_size, vision.depth, vision.hidden_size, vision.out_hidden_size)
    want = (3584, 28, 28, 4, 18944, 32, 1280, 3584)
    if got != want:
        raise ValueError(f"Qwen2.5-VL-7B config built as {got}, expected {want}")
    cfg._attn_implementation = "sdpa"
    return cfg


def build_mllm(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 2) -> Qwen25VLEmbedder:
    """The MLLM with random weights: the tiny Qwen2.5-VL for tiny configs, Qwen2.5-VL-7B's shape otherwise."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if config.tiny_qwen is not None:
        from ..step1x_ref.mllm.tiny_qwen import build_tiny_processor, tiny_qwen_config

        processor = build_tiny_processor(config.embedder.min_pixels, config.embedder.max_pixels)
        hf_config = tiny_qwen_config(config.tiny_qwen, processor.tokenizer)
        hf_config._attn_implementation = "sdpa"
    else:
        hf_config = qwen25_vl_7b_config()
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    # No tokenizer/processor: the harness feeds synthetic ids of the real sequence length (see mllm_inputs).
    return Qwen25VLEmbedder(model.eval(), None, config.embedder)


def build_mllm_with_processor(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 2
                              ) -> Qwen25VLEmbedder:
    """The MLLM with random weights that the runtime can drive end to end (image + instruction in): the tiny
    Qwen2.5-VL for tiny configs; for full-size ones Qwen2.5-VL-7B's shape with the tiny (code-built) tokenizer
    and processor.

    No tokenizer can be downloaded: the tiny one's special-token ids go into the 7B config (ids only, the
    shapes stay 7B's), so the real `Qwen25VLEmbedder.forward` runs.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..step1x_ref.mllm.tiny_qwen import build_tiny_processor

    if config.tiny_qwen is not None:
        return Qwen25VLEmbedder.tiny(config.tiny_qwen, config.embedder, seed=seed, dtype=dtype).to(device)
    processor = build_tiny_processor(config.embedder.min_pixels, config.embedder.max_pixels)
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(QWEN25_VL_7B_TEXT, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    hf_config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN25_VL_7B_VISION), **ids)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    return Qwen25VLEmbedder(model.eval(), processor, config.embedder)


def build_models(
    config_name: str,
    device: torch.device | str,
    *,
    dtype: torch.dtype,
    vae_dtype: torch.dtype = torch.float32,
    with_mllm: bool = True,
    with_vae: bool = True,
    seed: int = 0,
) -> BenchModels:
    config, device = get_config(config_name), torch.device(device)
    return BenchModels(
        config=config,
        dit=build_dit(config, device, dtype, seed),
        ae=build_vae(config, device, vae_dtype, seed + 1) if with_vae else None,
        mllm=build_mllm(config, device, dtype, seed + 2) if with_mllm else None,
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
    )


# -- inputs -------------------------------------------------------------------------------------------
@dataclass
class DiTInputs:
    """One CFG batch of the DiT at one resolution (what `denoise` hands the step function)."""

    size: int
    noise: Tensor  # [1, N, 64] float32
    ref: Tensor  # [1, N, 64] float32
    llm_embedding: Tensor  # [2, L, C]
    llm_mask: Tensor  # [2, L] int64
    pe: Tensor  # [1, 1, L + 2N, D/2, 2, 2] float32 (v1.2: [2, ...], a table per branch)
    timesteps: list[float]
    text: tuple[Tensor, ...] = ()  # v1.2: text_embeds [2, L, C], text_mask [2, L]: its one masked CFG call

    @property
    def conditioning(self) -> tuple[Tensor, ...]:
        """The DiT's inputs besides img and timestep, in the dit spec's order."""
        return (self.pe, self.llm_embedding, self.llm_mask, *self.text)

    def step_over(self, step: StepFn) -> StepFn:
        """`step` (over img, t and `conditioning`) as this edit runs it: v1.2's padded text keys masked."""
        return masked_step(step) if self.text else step

    @property
    def img(self) -> Tensor:
        return torch.cat([self.noise, self.ref], dim=1).expand(2, -1, -1)

    @property
    def t(self) -> Tensor:
        return torch.full((2,), self.timesteps[0], device=self.noise.device)

    @property
    def tokens(self) -> int:
        return self.llm_embedding.shape[1] + 2 * self.noise.shape[1]


def synthetic_texts(config: ModelConfig, size: int, gen: torch.Generator) -> list[V12Text]:
    """v1.2's MLLM output for a cond / uncond pair as the benchmark feeds it: 120 and 100 text tokens (no image
    tokens among them: their cost is the count), no quoted characters."""
    channels = config.embedder.hidden_size

    def text(length: int) -> V12Text:
        return V12Text(embedding=torch.randn(1, length, channels, generator=gen),
                       text_embeds=torch.randn(1, length, channels, generator=gen),
                       text_mask=torch.zeros(1, length, dtype=torch.long),
                       rope_positions=torch.arange(length)[:, None].expand(length, 3).contiguous(),
                       vision_mask=torch.zeros(length, dtype=torch.bool), vision_grid=(1, 1), image_size=(size, size))

    return [text(120), text(100)]


def dit_inputs(config: ModelConfig, size: int, steps: int, device: torch.device, seed: int = 0) -> DiTInputs:
    """Square `size`^2 edit inputs: seeded noise, an O(1) reference latent, an MLLM-like embedding with a
    realistic mask (cond: 120 kept tokens, uncond: 100), RoPE table and the shifted schedule. v1.2: the same
    lengths as its one masked CFG call pads them (`choices.TEXT_BUCKET`), with its text-token inputs."""
    if size % 16:
        raise ValueError(f"benchmark size {size} is not a multiple of 16")
    gen = torch.Generator().manual_seed(seed + 7)
    if edit_version(config).trimmed_text:
        noise, _, timesteps = sampling_inputs(config, 1, size, size, seed=seed, steps=steps)
        pe, emb, mask, *text = branch_conditioning(config, synthetic_texts(config, size, gen), size, size, TEXT_BUCKET)
        return DiTInputs(size=size, noise=noise.to(device),
                         ref=pack(torch.randn(1, 16, size // 8, size // 8, generator=gen)).to(device),
                         llm_embedding=emb.to(device), llm_mask=mask.to(device), pe=pe.to(device),
                         timesteps=timesteps, text=tuple(t.to(device) for t in text))
    length, channels = config.embedder.max_length, config.embedder.hidden_size
    emb = torch.randn(2, length, channels, generator=gen)
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0, :120], mask[1, :100] = 1, 1
    emb = emb * mask[..., None]  # padded tokens are zero, as select_tokens makes them
    noise, pe, timesteps = sampling_inputs(config, length, size, size, seed=seed, steps=steps)
    return DiTInputs(
        size=size,
        noise=noise.to(device),
        ref=pack(torch.randn(1, 16, size // 8, size // 8, generator=gen)).to(device),
        llm_embedding=emb.to(device),
        llm_mask=mask.to(device),
        pe=pe.to(device),
        timesteps=timesteps,
    )


def mllm_inputs(embedder: Qwen25VLEmbedder, seq_len: int = MLLM_SEQ_LEN,
                grid_thw: tuple[int, int, int] = MLLM_GRID_THW, seed: int = 0) -> tuple[MLLMInputs, Tensor]:
    """Synthetic ids of the real length with the image slots where the template puts them, and random pixels.

    Prefill cost depends on the lengths, not on which tokens: no tokenizer is needed (none can be downloaded).
    """
    cfg = embedder.model.config
    vision = cfg.vision_config
    merged = grid_thw[0] * grid_thw[1] * grid_thw[2] // vision.spatial_merge_size**2
    if merged + 20 >= seq_len:
        raise ValueError(f"MLLM sequence {seq_len} too short for {merged} image tokens")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(cfg.text_config.vocab_size, 150_000) - 100, (1, seq_len), generator=gen)
    specials = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    for special in specials:  # random ids must not collide with the special ones
        ids[ids == special] = 99
    start = 20
    ids[0, start - 1], ids[0, start + merged] = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids[0, start : start + merged] = cfg.image_token_id
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(grid_thw[0] * grid_thw[1] * grid_thw[2], patch_dim, generator=gen)
    inputs = MLLMInputs(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=pixels, image_grid_thw=torch.tensor([grid_thw]))
    return inputs, pixels


def mllm_stage_fn(embedder: Qwen25VLEmbedder, seq_len: int = MLLM_SEQ_LEN) -> Callable[[], tuple[Tensor, Tensor]]:
    """The MLLM stage of one edit: the vision tower once, the language model for cond and uncond, token select."""
    inputs, pixels = mllm_inputs(embedder, seq_len)
    uncond = MLLMInputs(input_ids=inputs.input_ids[:, : seq_len - 12], attention_mask=inputs.attention_mask[:, :-12],
                        pixel_values=pixels, image_grid_thw=inputs.image_grid_thw)

    @torch.inference_mode()
    def run() -> tuple[Tensor, Tensor]:
        image_embeds = embedder.encode_image(inputs.pixel_values, inputs.image_grid_thw)
        pairs = [select_tokens(embedder.last_hidden_state(x, image_embeds), embedder.params) for x in (inputs, uncond)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    return run


# -- activation sanity ----------------------------------------------------------------------------------
@torch.inference_mode()
def activation_check(model: Step1XEdit, inputs: DiTInputs, dtype: torch.dtype) -> dict[str, object]:
    """RMS of every block's output on one step: finite and O(1) means GEMMs see realistic data."""
    rms: list[float] = []
    finite = True

    def hook(_module: nn.Module, _args: object, out: object) -> None:
        nonlocal finite
        for t in out if isinstance(out, tuple) else (out,):
            t = t.float()
            finite = finite and bool(torch.isfinite(t).all())
            rms.append(float(t.pow(2).mean().sqrt()))

    blocks = [*model.double_blocks, *model.single_blocks]
    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        pred = dit_step_fn(model, inputs, dtype)(inputs.img, inputs.t)
    finally:
        for h in handles:
            h.remove()
    finite = finite and bool(torch.isfinite(pred).all())
    pred_rms = float(pred.pow(2).mean().sqrt())
    lo, hi = min(rms), max(rms)
    healthy = finite and lo > 1e-2 and hi < 1e3 and 1e-3 < pred_rms < 1e3
    return {"finite": finite, "block_rms_min": lo, "block_rms_max": hi, "pred_rms": pred_rms,
            "ok": healthy, "size": inputs.size}


def dit_step_fn(model: Step1XEdit, inputs: DiTInputs, dtype: torch.dtype) -> StepFn:
    """The eager DiT call on `inputs`' conditioning, in `dtype`, returning float32 (what `guided_euler` takes)."""
    pe, *rest = (c.to(dtype) if c.is_floating_point() and c is not inputs.pe else c for c in inputs.conditioning)
    call = inputs.step_over(lambda img, t, *conditioning: model(img, conditioning[0], t, *conditioning[1:]))

    @torch.inference_mode()
    def step(img: Tensor, t: Tensor) -> Tensor:
        return call(img.to(dtype), t.to(dtype), pe, *rest).float()

    return step
