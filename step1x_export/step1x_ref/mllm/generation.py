"""Text generation with the MLLM (Qwen2.5-VL), as v1.2's thinking and reflection call it.

transformers' `generate` with the published sampling settings (max 128 new tokens, nucleus sampling
top_p 0.9 at temperature 0.7; every other setting from the checkpoint's generation config, as upstream),
seeded: call i draws from `seed + i` under a forked RNG, so a run is reproducible and the caller's global
RNG is untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from PIL import Image

from .conditioner import fetch_image

MAX_NEW_TOKENS = 128
TOP_P = 0.9
TEMPERATURE = 0.7
# The judging client's image processor bounds (512^2 .. 896^2 pixels), and its image hand-over: a PNG
# thumbnail of at most 1024 px a side, then qwen_vl_utils' fetch (its own resize) before the processor's.
JUDGE_MIN_PIXELS, JUDGE_MAX_PIXELS = 262_144, 802_816
THUMBNAIL_SIDE = 1024

Content = Image.Image | str  # a user turn is a list of images and texts, in order


def judge_image(image: Image.Image) -> Image.Image:
    """The image as the judging client hands it to Qwen (the PNG round trip is lossless, so skipped)."""
    image = image.convert("RGB")
    if max(image.size) > THUMBNAIL_SIDE:
        image = image.copy()
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return fetch_image(image)


def judge_processor(processor):
    """A copy of `processor` whose image processor resizes to the judging bounds."""
    out = copy.copy(processor)
    out.image_processor = copy.deepcopy(processor.image_processor)
    out.image_processor.size = {"shortest_edge": JUDGE_MIN_PIXELS, "longest_edge": JUDGE_MAX_PIXELS}
    return out


@dataclass
class TextGenerator:
    """`generator(system, [image, text, ...]) -> str`: one chat turn answered by the MLLM."""

    model: torch.nn.Module  # Qwen2_5_VLForConditionalGeneration
    processor: object
    seed: int = 0
    calls: int = field(default=0, init=False)

    @classmethod
    def for_embedder(cls, embedder, seed: int = 0) -> TextGenerator:
        return cls(embedder.model, judge_processor(embedder.processor), seed)

    def messages(self, system: str, content: list[Content]) -> tuple[list[dict], list[Image.Image]]:
        items = [{"type": "image", "image": c} if isinstance(c, Image.Image) else {"type": "text", "text": c}
                 for c in content]
        images = [judge_image(c) for c in content if isinstance(c, Image.Image)]
        return [{"role": "system", "content": system}, {"role": "user", "content": items}], images

    @torch.no_grad()
    def __call__(self, system: str, content: list[Content]) -> str:
        messages, images = self.messages(system, content)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images or None, padding=True, return_tensors="pt")
        device = self.model.get_input_embeddings().weight.device
        inputs = inputs.to(device)
        eos = self.processor.tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + self.calls)
            self.calls += 1
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, top_p=TOP_P,
                                      temperature=TEMPERATURE, eos_token_id=eos, pad_token_id=eos)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0].strip()
