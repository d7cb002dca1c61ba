"""The MLLM embedder (step1x_ref.mllm.conditioner) on the tiny Qwen2.5-VL, CPU, fp32."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image

from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.mllm.conditioner import (
    Qwen25VL_7b_PREFIX,
    Qwen25VLEmbedder,
    build_mllm_inputs,
    fetch_image,
    retokenize_quotes,
    select_tokens,
    smart_resize,
    split_string,
)
from step1x_export.step1x_ref.weights.loading import CheckpointError

CFG = get_config("tiny")
PARAMS = CFG.embedder
HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + Qwen25VL_7b_PREFIX
QUOTED = 'Change the sign to read "OPEN" and the “SALE” label to red! Don\'t move it.'


@pytest.fixture(scope="module")
def embedder() -> Qwen25VLEmbedder:
    return Qwen25VLEmbedder.tiny(CFG.tiny_qwen, seed=0)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (200, 300, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_prefix_constant_is_upstreams():
    # Length and hash of upstream's `Qwen25VL_7b_PREFIX` value (its "\n" escapes make two blank lines).
    assert len(Qwen25VL_7b_PREFIX) == 1058
    assert Qwen25VL_7b_PREFIX.count("\n") == 9 and Qwen25VL_7b_PREFIX.count("\n\n") == 2
    digest = hashlib.sha256(Qwen25VL_7b_PREFIX.encode("utf-8")).hexdigest()
    assert digest == "40882ddca94ca6971c8d5713d42464afa31dad09236dfacafe3ee26b4b44aa82"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('say "hi" now', ['say "hi" now']),  # quotes before the index are left alone
        ("x" * 160 + 'a "bc" d', ["x" * 160 + 'a "', "“b”", "“c”", '" d']),
        ("x" * 160 + "“你好”", ["x" * 160 + '"', "“你”", "“好”", '"']),  # Chinese quotes become '"'
        ("x" * 160 + "don't", ["x" * 160 + 'don"', "“t”"]),  # an apostrophe opens a quote
        ("x" * 155 + '"a"', ["x" * 155 + '"a"']),  # idx 155 itself is not past the threshold
        ("x" * 156 + '"a"', ["x" * 156 + '"', "“a”", '"']),
        ("", []),
    ],
)
def test_split_string(text, expected):
    assert split_string(text, quote_index=155) == expected


def test_smart_resize_and_fetch():
    assert smart_resize(200, 300) == (196, 308)
    h, w = smart_resize(20, 30)  # below 4*28*28: scaled up
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 4 * 28 * 28
    h, w = smart_resize(10000, 12000)  # above 16384*28*28: scaled down
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 16384 * 28 * 28
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)
    rgba = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    out = fetch_image(rgba)
    assert out.mode == "RGB" and out.size == (308, 196) and out.getpixel((5, 5)) == (255, 255, 255)


def test_drop_tokens_cover_template_head(embedder, image):
    tok = embedder.processor.tokenizer
    head_ids = tok.encode(HEAD, add_special_tokens=False)
    assert len(head_ids) == PARAMS.drop_tokens
    ids = build_mllm_inputs(embedder.processor, "a cat", image, PARAMS).input_ids[0].tolist()
    assert ids[: PARAMS.drop_tokens] == head_ids
    assert tok.decode(ids[PARAMS.drop_tokens : PARAMS.drop_tokens + 6]) == "Picture 1: "
    assert ids[PARAMS.drop_tokens + 6] == tok.convert_tokens_to_ids("<|vision_start|>")


def test_quote_retokenisation_only_from_vision_end(embedder, image):
    proc = embedder.processor
    tok = proc.tokenizer
    vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
    inputs = build_mllm_inputs(proc, QUOTED, image, PARAMS)
    ids = inputs.input_ids[0]
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": Qwen25VL_7b_PREFIX}, {"type": "image"},
                                      {"type": "text", "text": QUOTED}]}],
        tokenize=False, add_generation_prompt=True, add_vision_id=True,
    )  # fmt: skip
    plain = proc(text=[text], images=[fetch_image(image)], return_tensors="pt")["input_ids"][0]
    cut = int((plain == vision_end).nonzero()[0, 0])
    assert int((ids == vision_end).nonzero()[0, 0]) == cut
    assert torch.equal(ids[:cut], plain[:cut])  # everything up to <|vision_end|> is the processor's
    new = retokenize_quotes(tok, text, PARAMS.quote_index)
    assert ids[cut:].tolist() == new[new.index(vision_end) :]
    assert not torch.equal(ids[cut:], plain[cut:])  # the quotes did change the tail
    # quoted characters are single tokens without their wrapping curly quotes
    tail = ids[cut:].tolist()
    letters = [tok.encode(c, add_special_tokens=False)[0] for c in "OPEN"]
    assert any(tail[i : i + 4] == letters for i in range(len(tail)))
    assert tok.encode("“", add_special_tokens=False)[0] not in tail
    # attention mask = ids > 0 ("!" is id 0, as in Qwen)
    assert torch.equal(inputs.attention_mask, (inputs.input_ids > 0).long())
    assert int((inputs.attention_mask == 0).sum()) == int((ids == 0).sum()) >= 1


def test_no_quotes_means_processor_ids(embedder, image):
    proc = embedder.processor
    inputs = build_mllm_inputs(proc, "make the sky blue", image, PARAMS)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": Qwen25VL_7b_PREFIX}, {"type": "image"},
                                      {"type": "text", "text": "make the sky blue"}]}],
        tokenize=False, add_generation_prompt=True, add_vision_id=True,
    )  # fmt: skip
    plain = proc(text=[text], images=[fetch_image(image)], return_tensors="pt")
    assert torch.equal(inputs.input_ids, plain["input_ids"])
    assert torch.equal(inputs.pixel_values, plain["pixel_values"])
    grid = inputs.image_grid_thw[0].tolist()
    assert 256 <= grid[0] * grid[1] * grid[2] // 4 <= 324  # processor bounds: 256..324 merged tokens


@pytest.mark.parametrize("instruction", [QUOTED, "", "make the sky blue"])
def test_matches_direct_transformers_forward(embedder, image, instruction):
    x = build_mllm_inputs(embedder.processor, instruction, image, PARAMS)
    model = embedder.model
    with torch.no_grad():
        out = model(
            input_ids=x.input_ids,
            attention_mask=x.attention_mask,
            pixel_values=x.pixel_values,
            image_grid_thw=x.image_grid_thw,
            # transformers 5 needs the token types to build 3-D mRoPE positions (4.x derived them from ids)
            mm_token_type_ids=(x.input_ids == model.config.image_token_id).int(),
            output_hidden_states=True,
        )
    ref_emb, ref_mask = select_tokens(out.hidden_states[-1], PARAMS)
    emb, mask = embedder([instruction], image)
    assert torch.equal(mask, ref_mask)
    err = rel_err(emb, ref_emb)
    print(f"embedder vs direct transformers forward ({instruction!r}): max rel err {err:.2e}")
    assert err <= 1e-5
    n = x.input_ids.shape[1] - PARAMS.drop_tokens
    assert int(mask.sum()) == n and mask[0, :n].eq(1).all() and mask[0, n:].eq(0).all()
    assert emb[0, n:].eq(0).all() and emb[0, :n].abs().sum(-1).gt(0).all()


def test_positions_are_3d_mrope(embedder, image):
    x = build_mllm_inputs(embedder.processor, "a", image, PARAMS)
    pos = embedder.position_ids(x)
    assert pos.shape == (3, 1, x.input_ids.shape[1])
    assert not torch.equal(pos[1], pos[2])  # height and width differ on the image tokens
    # text after the image resumes at start + max(h, w) / 2
    _, h, w = x.image_grid_thw[0].tolist()
    start = int((x.input_ids[0] == embedder.model.config.image_token_id).nonzero()[0, 0])
    assert int(pos[0, 0, -1]) == start + max(h, w) // 2 + (x.input_ids.shape[1] - start - h * w // 4) - 1


def test_shared_vision_pass_equals_separate_runs(embedder, image):
    emb, mask = embedder.encode_pair(QUOTED, image)
    assert emb.shape == (2, PARAMS.max_length, PARAMS.hidden_size) and mask.dtype == torch.long
    cond, cond_mask = embedder([QUOTED], image)
    uncond, uncond_mask = embedder([""], image)
    torch.testing.assert_close(emb, torch.cat([cond, uncond]), rtol=0, atol=0)
    assert torch.equal(mask, torch.cat([cond_mask, uncond_mask]))
    assert int(mask[0].sum()) > int(mask[1].sum()) > 0


def test_select_tokens_truncates_and_pads():
    params = replace(PARAMS, drop_tokens=3, max_length=5)
    hidden = torch.arange(1, 1 + 10 * 2, dtype=torch.float32).view(1, 10, 2)
    emb, mask = select_tokens(hidden, params)  # 7 kept -> truncated to 5
    assert torch.equal(emb, hidden[:, 3:8]) and mask.tolist() == [[1, 1, 1, 1, 1]]
    emb, mask = select_tokens(hidden[:, :5], params)  # 2 kept -> zero-padded
    assert torch.equal(emb[:, :2], hidden[:, 3:5]) and emb[:, 2:].eq(0).all()
    assert mask.tolist() == [[1, 1, 0, 0, 0]] and mask.dtype == torch.long
    emb, mask = select_tokens(hidden[:, :2], params)  # nothing past the drop
    assert emb.eq(0).all() and mask.sum() == 0


def test_truncation_at_max_length(embedder, image):
    short = Qwen25VLEmbedder(embedder.model, embedder.processor, replace(PARAMS, max_length=16))
    emb, mask = short(["a long instruction " * 4], image)
    full, _ = embedder(["a long instruction " * 4], image)
    assert mask.tolist() == [[1] * 16]
    torch.testing.assert_close(emb, full[:, :16], rtol=0, atol=0)


def test_from_pretrained_roundtrip_and_errors(embedder, image, tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing")):
        Qwen25VLEmbedder.from_pretrained(tmp_path / "missing", PARAMS)
    embedder.model.save_pretrained(tmp_path / "qwen")
    embedder.processor.save_pretrained(tmp_path / "qwen")
    loaded = Qwen25VLEmbedder.from_pretrained(tmp_path / "qwen", PARAMS, dtype=torch.float32)
    a, ma = embedder.encode_pair(QUOTED, image)
    b, mb = loaded.encode_pair(QUOTED, image)
    assert torch.equal(ma, mb) and rel_err(b, a) <= 1e-6
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'bad'} has config.json but no weights"):
        Qwen25VLEmbedder.from_pretrained(tmp_path / "bad", PARAMS)
    shutil.copy(tmp_path / "qwen" / "model.safetensors", tmp_path / "bad")
    with pytest.raises(CheckpointError, match=f"cannot load Qwen2.5-VL from {tmp_path / 'bad'}"):
        Qwen25VLEmbedder.from_pretrained(tmp_path / "bad", PARAMS)


def test_tiny_is_deterministic(embedder, image):
    again = Qwen25VLEmbedder.tiny(CFG.tiny_qwen, seed=0)
    assert again.processor.tokenizer.get_vocab() == embedder.processor.tokenizer.get_vocab()
    a, _ = embedder([QUOTED], image)
    b, _ = again([QUOTED], image)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
