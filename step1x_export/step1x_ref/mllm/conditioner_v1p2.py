"""v1.2's MLLM embedder (ReasonEdit): what the published diffusers pipeline `Step1XEditPipelineV1P2`
computes from Qwen2.5-VL for one instruction on one image.

Differences from v1.1's `Qwen25VLEmbedder`:
  - prompt: a new edit prefix, " ", the instruction, then the image (v1.1: prefix, image, instruction);
    no qwen_vl_utils first resize (the processor's own resize only, to 256..400 x 28^2 pixels).
  - tokenisation: the templated text is cut at every special token and at quotes ("..." or curly);
    each quoted character is tokenised alone and marked in `text_mask`.
  - the LLM runs without an attention mask (causal only); the mask `ids > 0` only feeds mRoPE.
  - kept tokens: the first `drop_tokens` dropped, at most `max_length` kept, no padding.
  - besides the last hidden state it returns the LLM's *input* embeddings (image features in the image
    slots) of the kept tokens, which the DiT's text-token mapping reads, and their mRoPE positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image

from .conditioner import MLLMInputs, Qwen25VLEmbedder

# The v1.2 edit prefix, byte for byte (line 3 ends with a space before its line break).
EDIT_PREFIX = (
    "Given a reference image and a user editing instruction.\n"
    "You need to understand the information of the reference image and the content of the editing instruction,\n"
    "and then generate a detailed description of the edited target image based on the reference image and the "
    "editing instruction. \n"
    "The description should include the requirements in the editing instruction and try to closely match the "
    "content of the target image.\n"
    "The editing instruction is:"
)
IMAGE_PAD = "<|image_pad|>"
QUOTE_PAIRS = {'"': '"', "“": "”"}  # opening -> closing


def split_quoted(text: str, skip: int) -> tuple[list[str], list[bool]]:
    """Cut `text` into pieces; each character between quotes is its own piece (flag True).

    The first `skip` characters are never examined. An opening quote ends the piece before it (for '"'
    even an empty one), a closing quote starts the next piece; an unclosed quote's characters are
    appended to the last unquoted piece.
    """
    pieces: list[str] = []
    quoted: list[bool] = []
    buffer, closing, inside = "", None, []
    for idx, char in enumerate(text):
        if idx < skip:
            buffer += char
        elif closing is None and char in QUOTE_PAIRS:
            if char == '"' or buffer:
                pieces.append(buffer + char)
                quoted.append(False)
            buffer, closing = "", QUOTE_PAIRS[char]
        elif closing is None:
            buffer += char
        elif char == closing:
            pieces += inside
            quoted += [True] * len(inside)
            buffer, closing, inside = char, None, []
        else:
            inside.append(char)
    if closing is not None:
        tail = "".join(inside) + buffer
        if pieces and not quoted[-1]:
            pieces[-1] += tail
        else:
            pieces.append(tail)
            quoted.append(False)
    elif buffer:
        pieces.append(buffer)
        quoted.append(False)
    return pieces, quoted


def special_tokens(tokenizer) -> list[str]:
    """Every added/special token's text (the cut points of the templated prompt)."""
    tokens = list(getattr(tokenizer, "additional_special_tokens", None) or [])
    tokens += [t.content for t in tokenizer.added_tokens_decoder.values()]
    return sorted(set(tokens), key=len, reverse=True)


def split_prompt(text: str, skip: int, specials: list[str]) -> tuple[list[str], list[bool]]:
    """Cut at special tokens (kept as pieces), then each other part by `split_quoted`; `skip` counts
    characters from the start of the whole text."""
    parts = [p for p in re.split(f"({'|'.join(map(re.escape, specials))})", text) if p]
    pieces: list[str] = []
    quoted: list[bool] = []
    start = 0
    for part in parts:
        if part in specials:
            sub, flags = [part], [False]
        else:
            sub, flags = split_quoted(part, max(0, skip - start))
        pieces += sub
        quoted += flags
        start += len(part)
    return pieces, quoted


@dataclass
class V12Inputs(MLLMInputs):
    text_mask: torch.Tensor  # [1, S] long: 1 on tokens of quoted characters


def build_v1p2_inputs(processor, instruction: str, image: Image.Image) -> V12Inputs:
    """Ids (each piece tokenised alone), the quoted-character mask and the image's pixels."""
    messages = [{"role": "user", "content": [{"type": "text", "text": f"{EDIT_PREFIX} {instruction}"},
                                             {"type": "image", "image": image}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    pieces, quoted = split_prompt(text, len(EDIT_PREFIX), special_tokens(processor.tokenizer))
    ids, marks, pixels = [], [], None
    for piece, is_quoted in zip(pieces, quoted, strict=True):
        if IMAGE_PAD in piece:
            pixels = processor(text=[piece], images=[image.convert("RGB")], return_tensors="pt")
            piece_ids = pixels["input_ids"][0]
        else:
            piece_ids = torch.tensor(processor.tokenizer.encode(piece, add_special_tokens=False), dtype=torch.long)
        ids.append(piece_ids)
        marks.append(torch.full_like(piece_ids, int(is_quoted)))
    if pixels is None:
        raise ValueError("the v1.2 prompt has no image placeholder: the processor's chat template lacks images")
    input_ids = torch.cat(ids).unsqueeze(0)
    return V12Inputs(input_ids=input_ids, attention_mask=(input_ids > 0).long(), pixel_values=pixels["pixel_values"],
                     image_grid_thw=pixels["image_grid_thw"], text_mask=torch.cat(marks).unsqueeze(0))


@dataclass
class V12Text:
    """One CFG branch's conditioning from the MLLM: the kept tokens only (L varies per instruction)."""

    embedding: torch.Tensor  # [1, L, H] last hidden state (after the final norm)
    text_embeds: torch.Tensor  # [1, L, H] the LLM's input embeddings (image features in image slots)
    text_mask: torch.Tensor  # [1, L] long, 1 on quoted characters
    rope_positions: torch.Tensor  # [L, 3] Qwen's mRoPE (t, h, w) positions of the kept tokens
    vision_mask: torch.Tensor  # [L] bool, the image tokens among the kept ones
    vision_grid: tuple[int, int]  # merged image-token grid (rows, cols)
    image_size: tuple[int, int]  # (width, height) of the image the MLLM read, before its own resize


class Qwen25VLEmbedderV12(Qwen25VLEmbedder):
    """Qwen2.5-VL -> one `V12Text` per instruction on one image (v1.2's rules from `ReasonEditParams`)."""

    def __init__(self, model, processor, params, *, bang_is_padding: bool = True, bf16_embeddings: bool = True):
        super().__init__(model, processor, params)
        self.bang_is_padding, self.bf16_embeddings = bang_is_padding, bf16_embeddings

    def prepare(self, instruction: str, image: Image.Image) -> V12Inputs:
        return build_v1p2_inputs(self.processor, instruction, image)

    def rope_mask(self, inputs: MLLMInputs) -> torch.Tensor:
        return inputs.attention_mask if self.bang_is_padding else torch.ones_like(inputs.input_ids)

    def position_ids(self, inputs: MLLMInputs) -> torch.Tensor:
        """mRoPE positions [3, 1, S]; masked slots get 1, as the published environment (transformers 4.x)
        fills them (transformers 5 fills 0)."""
        mask = self.rope_mask(inputs)
        positions, _ = self.model.model.get_rope_index(
            inputs.input_ids,
            mm_token_type_ids=(inputs.input_ids == self.model.config.image_token_id).int(),
            image_grid_thw=inputs.image_grid_thw,
            attention_mask=mask,
        )
        return positions.masked_fill(~mask.bool()[None], 1)

    def hidden_states(
        self, inputs: V12Inputs, image_embeds: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings, final-norm last hidden state), both [1, S, H]; the LLM attends causally only."""
        embeds = self.input_embeds(inputs, image_embeds)
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=positions.to(self.device), use_cache=False
        )
        return embeds, out.last_hidden_state

    def encode(self, instruction: str, image: Image.Image, image_embeds: torch.Tensor | None = None) -> V12Text:
        inputs = self.prepare(instruction, image)
        if image_embeds is None:
            image_embeds = self.encode_image(inputs.pixel_values, inputs.image_grid_thw)
        positions = self.position_ids(inputs)
        embeds, hidden = self.hidden_states(inputs, image_embeds, positions)
        keep = slice(self.params.drop_tokens, self.params.drop_tokens + self.params.max_length)
        if hidden.shape[1] <= self.params.drop_tokens:
            raise ValueError(f"the v1.2 prompt has {hidden.shape[1]} tokens, not more than the "
                             f"{self.params.drop_tokens} dropped: the tokenizer does not match this config")
        out_dtype = torch.bfloat16 if self.bf16_embeddings else hidden.dtype
        _, rows, cols = (int(v) // 2 for v in inputs.image_grid_thw[0])
        return V12Text(
            embedding=hidden[:, keep].to(out_dtype),
            text_embeds=embeds[:, keep].to(out_dtype),
            text_mask=inputs.text_mask[:, keep].to(self.device),
            rope_positions=positions[:, 0, keep].T.float(),
            vision_mask=(inputs.input_ids[0, keep] == self.model.config.image_token_id),
            vision_grid=(rows, cols),
            image_size=image.size,
        )

    @torch.no_grad()
    def forward(self, instructions: list[str], image: Image.Image) -> list[V12Text]:  # type: ignore[override]
        first = self.prepare(instructions[0], image)
        image_embeds = self.encode_image(first.pixel_values, first.image_grid_thw)  # same image for all
        return [self.encode(text, image, image_embeds) for text in instructions]
