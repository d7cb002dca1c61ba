"""Qwen2.5-VL's processor without its video half, and loading one from a Hugging Face directory.

Kept apart from `conditioner` because importing transformers' processor classes takes seconds, and
the CLI and the runtime import the conditioner module before they know whether they need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from ..configs import EmbedderParams


class ImageOnlyQwen25VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor (that one needs torchvision, not installed here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_processor(model_dir: Path, params: EmbedderParams):
    """The HF directory's processor with upstream's pixel bounds and the PIL image backend (as upstream's
    transformers 4.49 slow processor). Without torchvision, AutoProcessor cannot build Qwen's video
    processor and returns a bare tokenizer; then the image-only processor is assembled from the parts."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    bounds = {"min_pixels": params.min_pixels, "max_pixels": params.max_pixels, "backend": "pil"}
    processor = AutoProcessor.from_pretrained(model_dir, **bounds)
    if isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor"):
        return processor
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = tokenizer.chat_template
    if (model_dir / "chat_template.json").is_file():
        template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    elif (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    image_processor = AutoImageProcessor.from_pretrained(model_dir, **bounds)
    return ImageOnlyQwen25VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
