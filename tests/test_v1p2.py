"""v1.2 (ReasonEdit): expected values from the published diffusers pipeline
(`Peyton-Chen/diffusers` branch `step1xedit_v1p2`, `src/diffusers/pipelines/step1x_edit/pipeline_step1x_edit_v1p2.py`,
"v1p2.py:N" below; the transformer is `src/diffusers/models/transformers/transformer_step1x_edit.py`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.specs import dim_ranges, dit_spec
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.mllm.conditioner_v1p2 import EDIT_PREFIX, split_prompt, split_quoted
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.versions.v1p2_positions import branch_ids, branch_inputs, text_ids, vision_to_latent
from step1x_export.step1x_ref.weights.random_weights import randomize_

CONFIG = get_config("tiny-v1.2")


@pytest.fixture(scope="module")
def pipe() -> Step1XEditPipeline:
    return Step1XEditPipeline.random("tiny-v1.2")


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- prompt splitting: outputs of upstream's split_string_in_quotation(_and_special_tokens), v1p2.py:78-178 --
@pytest.mark.parametrize(("text", "skip", "expected"), [
    ('ab "CD" e “F”', 0, (['ab "', "C", "D", '" e “', "F", "”"], [False, True, True, False, True, False])),
    ('x "AB', 0, (['x "AB'], [False])),  # unclosed: the quoted characters go back to the last piece
    ("“Z” and \"Q\"", 0, (["Z", '” and "', "Q", '"'], [True, False, True, False])),  # empty buffer: no “ piece
    ('say "hi" now', 5, (['say "hi" now'], [False])),  # the first 5 characters are not examined
])
def test_split_quoted_matches_upstream(text, skip, expected):
    assert split_quoted(text, skip) == expected


def test_split_prompt_cuts_at_special_tokens():
    assert split_prompt('<|a|>pre "X"<|b|>', 0, ["<|a|>", "<|b|>"]) == (
        ["<|a|>", 'pre "', "X", '"', "<|b|>"], [False, False, True, False, False])


def test_edit_prefix_is_byte_exact():
    # v1p2.py:71-75, evaluated: 449 characters, line 3 ends with "\u0020" before its line break.
    assert len(EDIT_PREFIX) == 449
    assert "editing instruction. \nThe description" in EDIT_PREFIX and EDIT_PREFIX.endswith("instruction is:")


# -- the embedder: prompt order, drop, trimming, quoted-character mask ---------------------------------------
def test_drop_tokens_is_the_system_turn_plus_prefix(pipe):
    """90 real-tokenizer tokens (v1p2.py:324) = system turn + prefix; the tiny tokenizer's count is in the config."""
    processor = pipe.embedder.processor
    inputs = pipe.embedder.prepare("Write it", photo())
    ids = inputs.input_ids[0].tolist()
    head = processor.tokenizer.decode(ids[: CONFIG.embedder.drop_tokens])
    assert head.endswith(EDIT_PREFIX) and head.startswith("<|im_start|>system")
    # prompt order (v1p2.py:449-457): prefix, " ", instruction, then the image (labelled: add_vision_id)
    tail = processor.tokenizer.decode(ids[CONFIG.embedder.drop_tokens :])
    assert tail.startswith(" Write itPicture 1: <|vision_start|>")


def test_text_mask_marks_each_quoted_character(pipe):
    text = pipe.embedder.encode('Write "OK" and “你好”', photo())
    inputs = pipe.embedder.prepare('Write "OK" and “你好”', photo())
    kept = inputs.input_ids[0, CONFIG.embedder.drop_tokens :]
    marked = kept[text.text_mask[0].bool().cpu()]
    assert pipe.embedder.processor.tokenizer.decode(marked) == "OK你好"
    # each quoted character tokenised alone (v1p2.py:472-499): "O" and "K" are separate tokens
    assert len(pipe.embedder.processor.tokenizer.encode("OK", add_special_tokens=False)) < int(text.text_mask.sum())


def test_padding_trimmed_and_max_length_kept(pipe):
    """v1p2.py:554-565: kept = tokens[90:][:2048], no padding; all of them are real (mask 1)."""
    full = pipe.embedder.prepare("Make it red", photo()).input_ids.shape[1]
    text = pipe.embedder.encode("Make it red", photo())
    assert text.embedding.shape[1] == full - CONFIG.embedder.drop_tokens
    assert text.embedding.dtype == torch.bfloat16  # v1p2.py:411,414: bf16 buffers whatever the model dtype
    short = type(pipe.embedder)(pipe.embedder.model, pipe.embedder.processor,
                                replace(CONFIG.embedder, max_length=50))
    cut = short.encode("Make it red", photo())
    assert cut.embedding.shape[1] == 50
    assert torch.equal(cut.embedding, text.embedding[:, :50])


# -- position ids ----------------------------------------------------------------------------------------
def test_text_ids_from_mrope_temporal_index():
    """v1p2.py:565-566, 621-622: (T - (max T + 1), 0, 0) over the kept tokens."""
    rope = torch.tensor([[5, 5, 5], [6, 6, 6], [7, 8, 9], [7, 8, 10], [10, 10, 10]])
    assert torch.equal(text_ids(rope), torch.tensor([[-6.0, 0, 0], [-5, 0, 0], [-4, 0, 0], [-4, 0, 0], [-1, 0, 0]]))


@pytest.mark.isa
def test_vision_tokens_on_the_latent_grid_match_upstream():
    """Upstream's set_vision_tokens_position_ids (v1p2.py:335-403) for a 2 x 3 token grid from a 64 x 48 image,
    run on float32 and printed as hex: rows (y) then columns (x). Both invert a 3 x 3 matrix in float32
    (LAPACK, whose code path follows the CPU): equal to a few float32 roundings of the largest coordinate,
    not bit for bit (one CPU gives the printed bits, another differs in the last one)."""
    y = [float.fromhex("0x1.129e400000000p-5"), float.fromhex("0x1.876b0e0000000p+0")]
    x = [float.fromhex("-0x1.818ac00000000p-5"), float.fromhex("0x1.4800000000000p+0"),
         float.fromhex("0x1.4e062c0000000p+1")]
    expected = torch.tensor([[y[r], x[c]] for r in range(2) for c in range(3)], dtype=torch.float32)
    got = vision_to_latent((2, 3), (64, 48))
    roundings = 8 * torch.finfo(torch.float32).eps * expected.abs().max()  # inverse + product: a few each
    assert got.shape == expected.shape and (got - expected).abs().max() <= roundings
    # the same map in closed form: x_src = (28c + 13.5)(W_src - 1)/(W_res - 1), latent = (x_src - 11)/16
    closed = [((28 * c + 13.5) * 63 / 83 - 11) / 16 for c in range(3)]
    assert np.allclose(x, closed, rtol=1e-6)


def test_branch_ids_layout(pipe):
    text = pipe.embedder.encode("Make it red", photo())
    ids = branch_ids(text, 3, 4)[0]
    n_txt = text.embedding.shape[1]
    txt, noisy, ref = ids[:n_txt], ids[n_txt : n_txt + 12], ids[n_txt + 12 :]
    assert txt[-1, 0] == -1  # the last kept token
    vision = text.vision_mask.cpu()
    assert torch.equal(txt[vision, 1:], vision_to_latent(text.vision_grid, text.image_size))
    assert len(set(txt[vision, 0].tolist())) == 1  # the image keeps its start's temporal index
    assert torch.equal(txt[~vision, 1:], torch.zeros(int((~vision).sum()), 2))
    # v1p2.py:908-914: target (0, r, c), reference (1, r, c) (v1.1: (1, r + 1, c + 1))
    assert noisy[5].tolist() == [0, 1, 1] and ref[5].tolist() == [1, 1, 1] and ref[0].tolist() == [1, 0, 0]


def test_bang_is_padding_rule(pipe):
    """ids > 0 (v1p2.py:503) masks Qwen's "!" (id 0) out of mRoPE: it gets 1 (transformers 4's fill) and the
    tokens after it shift back by one; the rule off counts it."""
    embedder = pipe.embedder
    inputs = embedder.prepare("Hi! there", photo())
    bang = int((inputs.input_ids[0] == 0).nonzero()[0, 0])
    on = embedder.position_ids(inputs)[0, 0]
    off = type(embedder)(embedder.model, embedder.processor, embedder.params, bang_is_padding=False)
    off_pos = off.position_ids(inputs)[0, 0]
    assert on[bang] == 1 and on[bang + 1] == off_pos[bang + 1] - 1 and on[bang - 1] == off_pos[bang - 1]


# -- the DiT's text-token mapping ------------------------------------------------------------------------
def test_text_token_mapping_added_after_connector():
    """transformer_step1x_edit.py:1047-1054: txt = connector(...) + text_token_mapping(text_embeds) * text_mask."""
    model = randomize_(Step1XEdit(CONFIG), 0).eval()
    assert tuple(model.text_token_mapping.weight.shape) == (CONFIG.connector.hidden_size, CONFIG.embedder.hidden_size)
    g = torch.Generator().manual_seed(0)
    img, t = torch.randn(1, 8, 64, generator=g), torch.tensor([0.7])
    emb, text_embeds = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    mask, text_mask = torch.ones(1, 5, dtype=torch.long), torch.tensor([[0, 1, 1, 0, 0]])
    pe = torch.randn(1, 1, 13, 16, 2, 2, generator=g)
    with torch.no_grad():
        txt, y = model.connector(emb, t, mask)
        mapped = txt.clone()
        mapped[:, 1:3] += model.text_token_mapping(text_embeds)[:, 1:3]  # rows of quoted characters only
        expected = model.transformer(img, mapped, y, t, pe)
        assert torch.equal(model(img, pe, t, emb, mask, text_embeds, text_mask), expected)
        assert torch.equal(model(img, pe, t, emb, mask, text_embeds, torch.zeros_like(text_mask)),
                           model.transformer(img, txt, y, t, pe))


# -- config, specs, sampler ----------------------------------------------------------------------------
def test_config_numbers():
    c = get_config("v1.2")
    e = c.embedder
    assert (e.drop_tokens, e.max_length, e.min_pixels, e.max_pixels) == (90, 2048, 256 * 784, 400 * 784)
    assert c.default_steps == 50 and c.reason_edit.token_mapping_in == 3584
    # v1p2.py:1260: the 0-1000 timestep is compared with 0.93, i.e. sigma > 0.00093
    assert c.cfg_truncate == pytest.approx(0.00093) and get_config("v1.1").cfg_truncate == 0.93


def test_dit_spec_text_axis_is_dynamic():
    spec, ranges = dit_spec(CONFIG), dim_ranges(CONFIG)
    assert spec.input_names[-2:] == ["text_embeds", "text_mask"]
    assert spec.tensor("llm_embedding").dims[1] == "txt_len" and ranges["txt_len"][2] == 2048
    assert dit_spec(get_config("tiny")).tensor("llm_embedding").dims[1] == 640  # v1.1 stays static


# -- whole edits -----------------------------------------------------------------------------------------
def test_runtime_equals_reference(pipe):
    image = photo()
    ref = pipe.edit(image, 'Write "OK"', steps=2, size_level=64)
    with Step1XEditRuntime.from_pipeline(pipe) as rt:
        out = rt.edit(image, 'Write "OK"', steps=2, size_level=64)
    assert np.array_equal(np.asarray(ref), np.asarray(out))


def test_exported_dit_has_a_dynamic_text_axis(pipe, tmp_path):
    """One dit graph serves every text length (v1.2 trims padding): ORT vs torch at two lengths."""
    from step1x_export.export import export_components
    from step1x_export.runtime.engines.onnxruntime import OrtEngine

    manifest = export_components(pipe, tmp_path, components=["dit"], progress=False)
    assert "txt_len" in manifest.components["dit"].dims
    dit = OrtEngine.from_manifest(manifest, "dit", providers=["CPUExecutionProvider"])
    text = pipe.embedder.encode('Write "OK"', photo())
    for length in (text.embedding.shape[1] - 12, text.embedding.shape[1]):  # >= the min_pixels image (256)
        cut = replace(text, embedding=text.embedding[:, :length].float(),
                      text_embeds=text.text_embeds[:, :length].float(), text_mask=text.text_mask[:, :length],
                      rope_positions=text.rope_positions[:length], vision_mask=text.vision_mask[:length])
        inputs = {"img": torch.randn(1, 24, 64), "timestep": torch.tensor([0.8])} | branch_inputs(CONFIG, cut, 3, 4)
        got = dit(**inputs)["pred"]
        with torch.no_grad():
            ref = pipe.model(*(inputs[n] for n in dit_spec(CONFIG).input_names))
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"ORT vs torch dit, {length} text tokens: rel err {err:.2e}")
        assert got.shape == ref.shape and err < 1e-5

