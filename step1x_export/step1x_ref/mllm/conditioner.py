"""The MLLM embedder: Qwen2.5-VL reads the reference image and the instruction (upstream
`modules/conditioner.py`, `Qwen25VL_7b_Embedder`).

Pipeline, one sample at a time:
  1. `build_mllm_inputs` (CPU): chat template -> qwen_vl_utils-style image fetch (first resize) ->
     HF processor (second resize, patchify) -> quote re-tokenisation of the ids from <|vision_end|> on.
  2. `Qwen25VLEmbedder.encode_image`: the vision tower, run once per image (shared by cond/uncond).
  3. `Qwen25VLEmbedder.last_hidden_state`: token embeddings with the image features scattered in,
     3-D mRoPE positions from the model's own `get_rope_index`, the language model (final norm included).
  4. `select_tokens`: drop the template head, keep <= max_length tokens, zero-pad; mask 1 on kept tokens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from step1x_export.step1x_ref.configs import EmbedderParams
from step1x_export.step1x_ref.mllm.prompt_prefix import Qwen25VL_7b_PREFIX
from step1x_export.step1x_ref.weights.loading import CheckpointError, check_qwen_dir

# qwen_vl_utils `fetch_image` defaults (v0.0.10, the version upstream pins): the first resize.
IMAGE_FACTOR = 28
FETCH_MIN_PIXELS = 4 * 28 * 28
FETCH_MAX_PIXELS = 16384 * 28 * 28
MAX_ASPECT_RATIO = 200

VISION_END = "<|vision_end|>"
EXCERPT = 40  # characters of a cut text quoted in the warning
OPEN_QUOTE, CLOSE_QUOTE = "“", "”"


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = FETCH_MIN_PIXELS,
    max_pixels: int = FETCH_MAX_PIXELS,
) -> tuple[int, int]:
    """qwen_vl_utils' target size: both sides multiples of `factor`, area in [min, max], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def fetch_image(image: Image.Image) -> Image.Image:
    """qwen_vl_utils `fetch_image` for a PIL input: to RGB (RGBA over white), then smart_resize."""
    if image.mode == "RGBA":
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.split()[3])
    else:
        rgb = image.convert("RGB")
    width, height = rgb.size
    new_h, new_w = smart_resize(height, width)
    return rgb.resize((new_w, new_h))  # Pillow's default filter (bicubic), as upstream


def split_string(text: str, quote_index: int = 155) -> list[str]:
    """Upstream's in-forward `split_string`: pieces to tokenise one by one.

    Curly quotes and apostrophes become '"'. A '"' past `quote_index` toggles quoting; the text up to and
    including an opening quote is one piece, every quoted character becomes its own piece wrapped in
    curly quotes, a closing quote starts the next unquoted piece.
    """
    text = text.replace(OPEN_QUOTE, '"').replace(CLOSE_QUOTE, '"').replace("'", '"')
    pieces: list[str] = []
    in_quotes = False
    pending = ""
    for idx, char in enumerate(text):
        if char == '"' and idx > quote_index:
            pending += char
            if not in_quotes:
                pieces.append(pending)
                pending = ""
            in_quotes = not in_quotes
        elif in_quotes:
            pieces.append(OPEN_QUOTE + char + CLOSE_QUOTE)
        else:
            pending += char
    if pending:
        pieces.append(pending)
    return pieces


def _single_token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is not a single token for this tokenizer: {ids}")
    return ids[0]


def retokenize_quotes(tokenizer, text: str, quote_index: int) -> list[int]:
    """Token ids of `text` with each `split_string` piece tokenised alone (wrapping curly-quote ids stripped)."""
    open_id, close_id = _single_token_id(tokenizer, OPEN_QUOTE), _single_token_id(tokenizer, CLOSE_QUOTE)
    ids: list[int] = []
    for piece in split_string(text, quote_index):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        if piece_ids[0] == open_id and piece_ids[-1] == close_id:
            piece_ids = piece_ids[1:-1]
        ids += piece_ids
    return ids


def build_messages(instruction: str, image: Image.Image) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": Qwen25VL_7b_PREFIX},
                {"type": "image", "image": image},
                {"type": "text", "text": instruction},
            ],
        }
    ]


@dataclass
class MLLMInputs:
    input_ids: torch.Tensor  # [1, S] long
    attention_mask: torch.Tensor  # [1, S] long, = input_ids > 0 (as upstream)
    pixel_values: torch.Tensor  # [num_patches, 3 * 2 * 14 * 14]
    image_grid_thw: torch.Tensor  # [1, 3] long


def build_mllm_inputs(processor, instruction: str, image: Image.Image, params: EmbedderParams) -> MLLMInputs:
    """CPU preprocessing of one (instruction, image): ids with the quote re-tokenisation, and pixels."""
    fetched = fetch_image(image)
    text = processor.apply_chat_template(
        build_messages(instruction, fetched), tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    processed = processor(text=[text], images=[fetched], padding=True, return_tensors="pt")
    old_ids = processed["input_ids"][0]
    new_ids = torch.tensor(retokenize_quotes(processor.tokenizer, text, params.quote_index), dtype=torch.long)
    vision_end = processor.tokenizer.convert_tokens_to_ids(VISION_END)
    cut_old = int((old_ids == vision_end).nonzero()[0, 0])
    cut_new = int((new_ids == vision_end).nonzero()[0, 0])
    input_ids = cut_to_kept(torch.cat([old_ids[:cut_old], new_ids[cut_new:]]).unsqueeze(0), params, cut_old + 1,
                            instruction)
    return MLLMInputs(
        input_ids=input_ids,
        attention_mask=(input_ids > 0).long(),
        pixel_values=processed["pixel_values"],
        image_grid_thw=processed["image_grid_thw"],
    )


def cut_to_kept(input_ids: torch.Tensor, params: EmbedderParams, image_end: int, text: str) -> torch.Tensor:
    """Drop the tokens `select_tokens` would discard, before the LLM runs, and say so, naming the `text` cut:
    the MLLM reads the instruction and the negative prompt alike (text-to-image's default negative prompt is
    longer than a small model's reading).

    The LLM is causal, so the kept hidden states do not depend on the tokens after them: cutting the ids
    is exact, and a 100k-character instruction costs no more than one that fits. The first `image_end` ids
    (template and image, through <|vision_end|>) always stay: the vision features fill every image slot.
    """
    limit = max(params.drop_tokens + params.max_length, image_end)
    if input_ids.shape[1] <= limit:
        return input_ids
    start = text if len(text) <= EXCERPT else f"{text[:EXCERPT]}..."
    warnings.warn(f"text too long: the model reads {params.max_length} tokens after its template (image included) "
                  f"and {start!r} makes {input_ids.shape[1] - params.drop_tokens}; its last "
                  f"{input_ids.shape[1] - limit} tokens are ignored", stacklevel=3)
    return input_ids[:, :limit]


def select_tokens(last_hidden: torch.Tensor, params: EmbedderParams) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, S, H] -> emb [1, max_length, H] (tokens after `drop_tokens`, zero-padded), mask [1, max_length] long."""
    kept = last_hidden[:, params.drop_tokens :][:, : params.max_length]
    n = kept.shape[1]
    emb = nn.functional.pad(kept, (0, 0, 0, params.max_length - n))
    mask = torch.zeros(1, params.max_length, dtype=torch.long, device=last_hidden.device)
    mask[:, :n] = 1
    return emb, mask


class Qwen25VLEmbedder(nn.Module):
    """Qwen2.5-VL -> (emb [B, max_length, H], mask [B, max_length]) for a list of instructions on one image."""

    def __init__(self, model: nn.Module, processor, params: EmbedderParams) -> None:
        super().__init__()
        hidden = model.config.text_config.hidden_size
        if hidden != params.hidden_size:
            raise ValueError(f"MLLM hidden size {hidden} != EmbedderParams.hidden_size {params.hidden_size}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.params = params

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        params: EmbedderParams,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        processor_dir: str | Path | None = None,
    ) -> Qwen25VLEmbedder:
        """Qwen2.5-VL from a Hugging Face folder; the processor from `processor_dir` where it lives apart
        (the diffusers layout's processor/), else from the same folder."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        model_dir = Path(model_dir)
        check_qwen_dir(model_dir)
        try:
            from .qwen_processor import load_processor

            processor = load_processor(Path(processor_dir or model_dir), params)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                model_dir, dtype=dtype, attn_implementation="sdpa"
            )
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot load Qwen2.5-VL from {model_dir}: {err}") from err
        return cls(model.to(device), processor, params)

    @classmethod
    def tiny(
        cls,
        config_overrides: dict,
        params: EmbedderParams | None = None,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Qwen25VLEmbedder:
        """Random-weight tiny Qwen2.5-VL built in code (`ModelConfig.tiny_qwen`), default params of `tiny`."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        from step1x_export.step1x_ref.configs import get_config
        from step1x_export.step1x_ref.mllm.tiny_qwen import build_tiny_processor, tiny_qwen_config

        params = params or get_config("tiny").embedder
        processor = build_tiny_processor(params.min_pixels, params.max_pixels)
        config = tiny_qwen_config(config_overrides, processor.tokenizer)
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
        return cls(model, processor, params)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def prepare(self, instruction: str, image: Image.Image) -> MLLMInputs:
        return build_mllm_inputs(self.processor, instruction, image, self.params)

    def encode_image(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The vision tower (merger included): [num_image_tokens, H]."""
        out = self.model.model.visual(pixel_values.to(self.device, self.dtype), grid_thw=image_grid_thw.to(self.device))
        return out.pooler_output

    def position_ids(self, inputs: MLLMInputs) -> torch.Tensor:
        """3-D mRoPE positions [3, 1, S] from the model's own `get_rope_index`."""
        image_token_id = self.model.config.image_token_id
        positions, _ = self.model.model.get_rope_index(
            inputs.input_ids,
            mm_token_type_ids=(inputs.input_ids == image_token_id).int(),
            image_grid_thw=inputs.image_grid_thw,
            attention_mask=inputs.attention_mask,
        )
        return positions

    def input_embeds(self, inputs: MLLMInputs, image_embeds: torch.Tensor) -> torch.Tensor:
        """The language model's input [1, S, H]: token embeddings with `image_embeds` in the image slots."""
        ids = inputs.input_ids.to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.model.config.image_token_id).unsqueeze(-1)
        if int(slots.sum()) * embeds.shape[-1] != image_embeds.numel():
            raise ValueError(f"{int(slots.sum())} image tokens but image features of shape {tuple(image_embeds.shape)}")
        return embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))

    def last_hidden_state(self, inputs: MLLMInputs, image_embeds: torch.Tensor) -> torch.Tensor:
        """The language model's final-norm hidden states [1, S, H] with `image_embeds` in the image slots."""
        out = self.model.model.language_model(
            inputs_embeds=self.input_embeds(inputs, image_embeds),
            attention_mask=inputs.attention_mask.to(self.device),
            position_ids=self.position_ids(inputs).to(self.device),
            use_cache=False,
        )
        return out.last_hidden_state

    @torch.no_grad()
    def forward(self, instructions: list[str], image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        batch = [self.prepare(text, image) for text in instructions]
        image_embeds = self.encode_image(batch[0].pixel_values, batch[0].image_grid_thw)  # same image for all
        embs, masks = zip(
            *(select_tokens(self.last_hidden_state(x, image_embeds), self.params) for x in batch), strict=True
        )
        return torch.cat(embs), torch.cat(masks)

    def encode_pair(self, instruction: str, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG batch [cond, uncond]: the instruction and "" on the same image."""
        return self([instruction, ""], image)
