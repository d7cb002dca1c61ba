"""v1.2's thinking and reflection in the plan: what an edit runs, and the MLLM's text generation on meta.

Thinking is one `generate` call over the source image; each reflection round is an edit and a judgement of
five calls (describe, consistency, reflect, score1, score2) over up to two images at the judge's
resolution, each answer up to the published 128 new tokens (`step1x_ref.mllm.generation`). Generation needs
the LM head (the embedder drops it), a KV cache, and logits for the last position only (as `generate`
computes them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..calibrate.weight_only import WEIGHT_ONLY_FORMATS
from ..step1x_ref.configs import get_config
from ..step1x_ref.mllm.generation import JUDGE_MAX_PIXELS, MAX_NEW_TOKENS
from ..step1x_ref.versions import EditVersion, edit_version
from .stages import build_stage, meta_inputs, qwen_config
from .tracer import trace_peak

# The longest judging prompt's text: the reflection prompt (3564 characters, system + user: under 1188 tokens at
# >= 3 characters a token), an instruction of up to the embedder's 640 tokens and the chat template stay under
# 2048 tokens; its images: two at the judge's max_pixels (28 x 28 pixels a token).
JUDGE_TEXT_TOKENS = 2048
JUDGE_IMAGE_TOKENS = JUDGE_MAX_PIXELS // 28**2
JUDGE_CALLS = 5  # describe, consistency, reflect, score1, score2: one judgement's generate calls


@dataclass(frozen=True)
class Mode:
    """What an edit runs: the version, v1.2's thinking and reflection rounds, the steps."""

    model: str = "v1.1"
    think: bool = False
    reflect: int = 0

    def __post_init__(self) -> None:
        if (self.think or self.reflect) and not self.version.reasoning:
            raise ValueError(f"--think and --reflect are v1.2 features; {self.model} has no thinking or reflection")
        if self.reflect < 0:
            raise ValueError(f"--reflect must be >= 0 rounds, got {self.reflect}")

    @property
    def generates(self) -> bool:
        return self.think or self.reflect > 0

    @property
    def dit_runs(self) -> int:
        return max(1, self.reflect)  # every reflection round edits again (at most `reflect` edits)

    @property
    def mllm_entries(self) -> int:
        """Times per edit the MLLM's stage starts: once (thinking and encoding), then after each judgement."""
        return 1 + self.reflect

    @property
    def generate_calls(self) -> int:
        return int(self.think) + JUDGE_CALLS * self.reflect

    @property
    def calls_per_step(self) -> int:
        """DiT calls per denoising step: v1.1 runs both CFG branches in one call, v1.2 one call per branch (the
        published pipeline's; its one masked call is a runtime option)."""
        return 2 if self.version.per_branch_dit else 1

    @property
    def version(self) -> EditVersion:
        return edit_version(get_config(self.model))

    @property
    def steps(self) -> int:
        return get_config(self.model).default_steps


def kv_cache_bytes(model: str, tokens: int) -> int:
    """Qwen2.5-VL's bf16 KV cache for `tokens`: layers x (K, V) x KV heads x head dim x 2 bytes."""
    text = _qwen_text_config(model)
    head_dim = text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * tokens * 2


def _qwen_text_config(model: str):
    return qwen_config(get_config(model)).get_text_config()


@functools.lru_cache(maxsize=8)
def generation_activations(model: str) -> int:
    """Thinking / judging: the vision tower over two judge images, the prefill of the longest judging prompt
    (last hidden state; logits for the last token only, as `generate` computes them), plus the KV cache at
    that prompt and the published max new tokens."""
    from ..export.qwen import LLMExport, VisionExport
    from ..specs import VISION_MERGE_UNIT, llm_spec, vision_spec

    cfg = get_config(model)
    stage = build_stage("mllm", cfg, 256, 256, dtype=torch.bfloat16, quant=None, weight_only=None,
                        mllm_quant=WEIGHT_ONLY_FORMATS["int8"])
    qwen = stage.module
    image_tokens = 2 * JUDGE_IMAGE_TOKENS
    prompt = image_tokens + JUDGE_TEXT_TOKENS
    dims = {"batch": 1, "vis_tokens": image_tokens, "vis_patches": VISION_MERGE_UNIT * image_tokens, "llm_seq": prompt}
    vision, llm = VisionExport(qwen.model.visual), LLMExport(qwen.model.language_model, qwen.config.image_token_id)
    existing = (*qwen.parameters(), *qwen.buffers())
    peaks = []
    for forward, spec in ((vision, vision_spec(cfg)), (llm, llm_spec(cfg))):
        inputs = meta_inputs(spec, dims, torch.bfloat16)
        peaks.append(trace_peak(lambda f=forward, x=inputs: f(*x), (*existing, *inputs)).peak_bytes)
    logits = _qwen_text_config(model).vocab_size * 4
    return max(peaks) + kv_cache_bytes(model, prompt + MAX_NEW_TOKENS) + logits


def lm_head_bytes(model: str, fmt, dtype: torch.dtype) -> int:
    """Qwen's LM head (kept for generation) in `fmt` (an 8-bit `QuantFormat`: weight + float32 scales; None:
    `dtype`)."""
    from ..presets import FORMATS
    from .weights import format_bytes

    text = _qwen_text_config(model)
    n, k = text.vocab_size, text.hidden_size
    return format_bytes(FORMATS["int8"], n, k) if fmt is not None else n * k * dtype.itemsize
