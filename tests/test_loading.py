"""Checkpoints written with the official key names load strictly; bad files give named errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.vae.autoencoder import AutoEncoder
from step1x_export.step1x_ref.weights.loading import CheckpointError, ModelFiles, load_into
from step1x_export.step1x_ref.weights.random_weights import randomize_


def write(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def build(name: str):
    return lambda: Step1XEdit(get_config(name))


def test_dit_roundtrip_bf16(tmp_path: Path) -> None:
    path = tmp_path / "dit.safetensors"
    state = write(randomize_(Step1XEdit(get_config("tiny")), 3), path)
    loaded = load_into(build("tiny"), path, dtype=torch.bfloat16)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, state[k]), k
    assert not any(p.requires_grad for p in loaded.parameters())


def test_fp8_stored_file_is_upcast(tmp_path: Path) -> None:
    path = tmp_path / "dit-FP8.safetensors"
    state = write(randomize_(Step1XEdit(get_config("tiny-v1.0")), 4), path, torch.float8_e4m3fn)
    loaded = load_into(build("tiny-v1.0"), path, dtype=torch.float32)
    w = loaded.state_dict()["single_blocks.0.linear1.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, state["single_blocks.0.linear1.weight"].float())


def test_vae_roundtrip_fp32(tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    state = write(randomize_(AutoEncoder(get_config("tiny").vae), 5), path, torch.float32)
    loaded = load_into(lambda: AutoEncoder(get_config("tiny").vae), path, dtype=torch.float32)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_v10_file_loaded_as_v11_names_scale_factor(tmp_path: Path) -> None:
    path = tmp_path / "v10.safetensors"
    write(Step1XEdit(get_config("tiny-v1.0")), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: connector\.scale_factor"):
        load_into(build("tiny"), path, dtype=torch.float32)
    path11 = tmp_path / "v11.safetensors"
    write(Step1XEdit(get_config("tiny")), path11)
    with pytest.raises(CheckpointError, match=r"missing keys: connector\.scale_factor"):
        load_into(build("tiny-v1.0"), path11, dtype=torch.float32)


def test_missing_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in Step1XEdit(get_config("tiny")).state_dict().items()}
    del state["double_blocks.1.img_attn.proj.bias"]
    state["final_layer.linear.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_into(build("tiny"), path, dtype=torch.float32)
    msg = str(info.value)
    assert str(path) in msg
    assert "double_blocks.1.img_attn.proj.bias" in msg
    assert "final_layer.linear.weight: checkpoint (3, 3), model (64, 64)" in msg


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "dit.safetensors"
    write(Step1XEdit(get_config("tiny")), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_into(build("tiny"), path, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_into(build("tiny"), tmp_path / "nope.safetensors", dtype=torch.float32)


def test_model_dir_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelFiles.in_dir(tmp_path / "absent", "v1.1")
    with pytest.raises(CheckpointError, match="step1x-edit-v1p1-official.safetensors"):
        ModelFiles.in_dir(tmp_path, "v1.1")
    (tmp_path / "step1x-edit-i1258-FP8.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="vae.safetensors"):
        ModelFiles.in_dir(tmp_path, "v1.0")
    (tmp_path / "vae.safetensors").write_bytes(b"")
    (tmp_path / "Qwen2.5-VL-7B-Instruct").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelFiles.in_dir(tmp_path, "v1.0")
    (tmp_path / "Qwen2.5-VL-7B-Instruct" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        ModelFiles.in_dir(tmp_path, "v1.0")  # caught before anything is loaded
    (tmp_path / "Qwen2.5-VL-7B-Instruct" / "model.safetensors").write_bytes(b"")
    files = ModelFiles.in_dir(tmp_path, "v1.0")
    assert files.dit.name == "step1x-edit-i1258-FP8.safetensors"
