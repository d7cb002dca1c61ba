"""The diffusers layout: one key map, both ways (identity round trips, diffusers' own VAE converter agrees),
detected automatically, and an edit from either layout is bit-identical; errors name the file and key."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from step1x_export.cli import main
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.vae.autoencoder import AutoEncoder
from step1x_export.step1x_ref.weights import diffusers_layout
from step1x_export.step1x_ref.weights.diffusers_layout import PIPELINE_VERSIONS, Rule, dit_keymap, vae_keymap
from step1x_export.step1x_ref.weights.loading import CheckpointError, ModelFiles
from step1x_export.step1x_ref.weights.random_weights import randomize_

TINY = get_config("tiny")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_dit_map_round_trips_both_ways() -> None:
    keymap = dit_keymap(TINY.dit.hidden_size)
    official = randomize_(Step1XEdit(TINY), 0).state_dict()
    diffusers = keymap.to_diffusers(official)
    assert_same(keymap.to_official(diffusers), official)
    assert_same(keymap.to_diffusers(keymap.to_official(diffusers)), diffusers)
    # the re-layout, value by value (convert_step1x_edit_to_diffusers.py: chunk(3), split(h, h, h, 4h), swap)
    h = TINY.dit.hidden_size
    q, k, v = official["double_blocks.1.txt_attn.qkv.weight"].chunk(3)
    assert torch.equal(diffusers["transformer_blocks.1.attn.add_k_proj.weight"], k)
    mlp = official["single_blocks.0.linear1.bias"][3 * h :]
    assert torch.equal(diffusers["single_transformer_blocks.0.proj_mlp.bias"], mlp)
    shift, scale = official["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(diffusers["norm_out.linear.weight"], torch.cat([scale, shift]))
    assert torch.equal(diffusers["transformer_blocks.0.attn.norm_added_q.weight"],
                       official["double_blocks.0.txt_attn.norm.query_norm.scale"])
    with pytest.raises(ValueError, match=r"qkv\.weight is split into 3 tensors; missing transformer_blocks\.1\.attn"
                                         r"\.to_k\.weight, transformer_blocks\.1\.attn\.to_v\.weight"):
        keymap.to_official({"transformer_blocks.1.attn.to_q.weight": q})


def test_full_size_dit_key_set_on_meta() -> None:
    """The published v1.1 transformer's names, from the conversion script's literal keys (no memory: meta)."""
    with torch.device("meta"):
        official = Step1XEdit(get_config("v1.1")).state_dict()
    diffusers = dit_keymap(3072).to_diffusers(official)
    connector = len([k for k in official if k.startswith("connector.")])
    # per double block 24 -> 32 tensors (qkv x2 split in three), per single block 8 -> 14 (linear1 in four)
    assert len(official) == 19 * 24 + 38 * 8 + 16 + connector
    assert len(diffusers) == 19 * 32 + 38 * 14 + 16 + connector
    for key, shape in {
        "time_embed.in_layer.weight": (3072, 256),
        "vec_embed.out_layer.bias": (3072,),
        "context_embedder.weight": (3072, 4096),
        "transformer_blocks.18.attn.to_v.weight": (3072, 3072),
        "transformer_blocks.0.ff_context.net.0.proj.weight": (12288, 3072),
        "single_transformer_blocks.37.proj_mlp.weight": (12288, 3072),
        "single_transformer_blocks.0.proj_out.weight": (3072, 15360),
        "norm_out.linear.weight": (6144, 3072),
        "proj_out.weight": (64, 3072),
    }.items():
        assert tuple(diffusers[key].shape) == shape, key


@pytest.mark.parametrize("params", [TINY.vae, replace(TINY.vae, ch_mult=(1, 2, 1), num_res_blocks=1, z_channels=8)],
                         ids=["tiny", "3-levels"])
def test_vae_map_equals_diffusers_own_converter(params) -> None:
    official = randomize_(AutoEncoder(params), 1).state_dict()
    levels = len(params.ch_mult)
    ours = vae_keymap(levels).to_diffusers(official)
    theirs = convert_ldm_vae_checkpoint(dict(official), {"down_block_types": [0] * levels,
                                                         "up_block_types": [0] * levels})
    assert_same(ours, theirs)
    assert_same(vae_keymap(levels).to_official(ours), official)


def test_a_later_version_adds_a_weight_in_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(diffusers_layout.EXTRA_DIT_RULES, "vX", (Rule("text_token_mapping.*", "text_token_mapping.*"),))
    state = {"text_token_mapping.weight": torch.ones(4, 3), "final_layer.linear.bias": torch.zeros(2)}
    keymap = dit_keymap(64, "vX")
    assert_same(keymap.to_official(keymap.to_diffusers(state)), state)
    with pytest.raises(ValueError, match="no diffusers name for key 'text_token_mapping.weight'"):
        dit_keymap(64).to_diffusers(state)


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layouts")
    pipe = Step1XEditPipeline.random("tiny", seed=0)
    pipe.save_pretrained(root / "official")
    files = pipe.save_pretrained(root / "diffusers", layout="diffusers", shards=3)
    assert files.layout == "diffusers" and files.dit.name == "diffusion_pytorch_model.safetensors.index.json"
    return root / "official", root / "diffusers"


def test_edit_from_either_layout_is_identical(two_layouts: tuple[Path, Path], tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(src)
    images = []
    for folder in two_layouts:  # no layout flag: the folder says which it is
        out = tmp_path / f"{folder.name}.png"
        result = CliRunner().invoke(main, ["edit", "--model-dir", str(folder), "--version", "tiny", "--image", str(src),
                                           "--prompt", "add a hat", "--out", str(out), "--steps", "2",
                                           "--size-level", "32", "--quiet"])
        assert result.exit_code == 0, result.output
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images)


def test_diffusers_errors_name_file_and_key(two_layouts: tuple[Path, Path], tmp_path: Path) -> None:
    _, good = two_layouts
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    index = json.loads((bad / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = bad / "transformer" / index["weight_map"]["proj_out.weight"]
    state = load_file(str(shard))
    state["proj_out.lora.weight"] = state.pop("proj_out.weight")
    save_file(state, str(shard))
    index["weight_map"]["proj_out.lora.weight"] = index["weight_map"].pop("proj_out.weight")
    (bad / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing keys: proj_out\.weight; 1 unexpected keys: "
                                              rf"proj_out\.lora\.weight \(in {shard.name}\)"):
        Step1XEditPipeline.from_pretrained(bad, config=TINY, dtype=torch.float32)

    index["weight_map"]["ghost.weight"] = shard.name
    (bad / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not hold what .*index.json lists: ghost\.weight"):
        Step1XEditPipeline.from_pretrained(bad, config=TINY, dtype=torch.float32)

    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="pipeline 'FluxPipeline' is not a Step1X-Edit pipeline"):
        ModelFiles.in_dir(bad, "v1.1")
    with pytest.raises(CheckpointError, match=r"holds v1\.1 weights .*not v1\.0"):
        ModelFiles.in_dir(good, "v1.0")


def test_v12_token_mapping_round_trips_through_the_diffusers_names():
    """v1.2 ships only in the diffusers layout: its extra `text_token_mapping` keeps its name there."""
    pipe = Step1XEditPipeline.random("tiny-v1.2", seed=0)
    state = pipe.model.state_dict()
    keymap = dit_keymap(pipe.config.dit.hidden_size, "v1.2")
    diffusers = keymap.to_diffusers(state)
    assert {"text_token_mapping.weight", "text_token_mapping.bias"} <= set(diffusers)
    back = keymap.to_official(diffusers)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert PIPELINE_VERSIONS["Step1XEditPipelineV1P2"] == "v1.2"  # the v1.2 port's pipeline class
