"""A tiny Qwen2.5-VL built entirely in code, for tests and the CPU demo.

Nothing is downloaded: the tokenizer is a byte-level BPE whose merges are learned here from a fixed
corpus (deterministic), carrying Qwen's special tokens; the processor pairs it with the Qwen2-VL image
processor (PIL backend) and Qwen2.5-VL-7B-Instruct's chat template. Token ids follow Qwen's layout:
the 256 byte symbols first in GPT-2 `bytes_to_unicode` order (so "!" is id 0, as in Qwen, which
matters for upstream's `attention_mask = ids > 0`), then merges, then the special tokens.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from itertools import pairwise

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from step1x_export.step1x_ref.mllm.prompt_prefix import Qwen25VL_7b_PREFIX
from step1x_export.step1x_ref.mllm.qwen_processor import ImageOnlyQwen25VLProcessor

# Qwen2.5-VL-7B-Instruct's chat template (chat_template.json), with its default system turn and
# the `add_vision_id` "Picture N: " labels.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's special tokens, in Qwen's id order (151643 onward in the real vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

NUM_LEARNED_MERGES = 400
# Symbols that must be single tokens, as in Qwen: the curly quotes (upstream strips their ids).
_FORCED_SYMBOLS = ("“", "”")
_EXTRA_CORPUS = (
    'Change the sign to read "OPEN" and the color of the car to red.',
    "Replace the text “SALE” with “NEW”. Make it a sunny day; remove the person on the left.",
    "Add a small dog next to the cat, turn the sky into a sunset, and don't change the background.",
    "把图中的文字改成“你好”，将背景换成蓝色。",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (ids 0..255 follow this order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _corpus() -> list[str]:
    return ["You are a helpful assistant.", "system user assistant Picture 1: ", Qwen25VL_7b_PREFIX, *_EXTRA_CORPUS]


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _learn_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: most frequent pair first, ties broken by the pair's text (deterministic)."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, freq in words.items():
            merged[_merge_word(word, best)] += freq
        words = merged
    return merges


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    vocab, merges = _tiny_vocab_and_merges()
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))


@functools.cache
def _tiny_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The tiny vocabulary and merges, learned once per process (pure data; callers copy it)."""
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    bare = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(base)}, merges=[])
    pre = bare.backend_tokenizer.pre_tokenizer

    merges: list[tuple[str, str]] = []
    for symbol in _FORCED_SYMBOLS:  # left-to-right merges building each symbol from its bytes
        units = [b2u[b] for b in symbol.encode("utf-8")]
        acc = units[0]
        for unit in units[1:]:
            if (acc, unit) not in merges:
                merges.append((acc, unit))
            acc += unit

    words: Counter = Counter()
    for text in _corpus():
        for piece, _ in pre.pre_tokenize_str(text):
            word = tuple(piece)
            for pair in merges:
                word = _merge_word(word, pair)
            words[word] += 1
    merges += _learn_merges(words, NUM_LEARNED_MERGES)

    vocab = {c: i for i, c in enumerate(base)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, tuple(merges)


def build_tiny_processor(min_pixels: int, max_pixels: int) -> Qwen2_5_VLProcessor:
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return ImageOnlyQwen25VLProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(), chat_template=QWEN25_VL_CHAT_TEMPLATE
    )


def tiny_qwen_config(overrides: dict, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config from `ModelConfig.tiny_qwen` ({"text": {...}, "vision": {...}}), ids from `tokenizer`."""
    text = copy.deepcopy(overrides["text"])
    vision = copy.deepcopy(overrides["vision"])
    heads = text["num_attention_heads"]
    if text["hidden_size"] % heads:
        raise ValueError(f"text hidden_size {text['hidden_size']} is not divisible by {heads} heads")
    head_dim = text["hidden_size"] // heads
    section = text["rope_scaling"]["mrope_section"]
    if 2 * sum(section) != head_dim:
        raise ValueError(f"mrope_section {section} sums to {sum(section)}, expected head_dim/2 = {head_dim // 2}")
    if vision["out_hidden_size"] != text["hidden_size"]:
        raise ValueError(
            f"vision out_hidden_size {vision['out_hidden_size']} != text hidden_size {text['hidden_size']}"
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text.update(
        vocab_size=len(tokenizer),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
