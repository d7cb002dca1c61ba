"""LoRA in upstream's kohya format: merged into exactly the targeted weights by alpha/rank x multiplier (fp32,
cast back), before the runtime, export and calibration see the model; mismatched files refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from PIL import Image
from safetensors.torch import load_file, save_file

from step1x_export.cli import main
from step1x_export.export.manifest import ExportError, load_manifest
from step1x_export.export.refit import refit_names
from step1x_export.hashing import file_sha256
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.weights.lora import LoraError, LoraSpec, merge_lora

# (kohya name, module, rank, alpha stored in the file: None = no alpha key, 0 = "no scaling")
LAYERS = [
    ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", 4, 2.0),
    ("lora_unet_double_blocks_1_txt_mlp_2", "double_blocks.1.txt_mlp.2", 2, 8.0),
    ("lora_unet_single_blocks_1_linear1", "single_blocks.1.linear1", 3, 0.0),
    ("lora_unet_single_blocks_0_modulation_lin", "single_blocks.0.modulation.lin", 2, 1.0),
    ("lora_unet_txt_in", "txt_in", 2, None),
]


def write_kohya(model: torch.nn.Module, path: Path, layers=LAYERS, seed: int = 0) -> dict[str, tuple]:
    """A LoRA file with upstream's key names (bf16, as sd-scripts saves); returns name -> (down, up, alpha)."""
    gen = torch.Generator().manual_seed(seed)
    state, parts = {}, {}
    for name, module, rank, alpha in layers:
        out_f, in_f = model.get_submodule(module).weight.shape
        down = (torch.randn(rank, in_f, generator=gen) * 0.1).bfloat16()
        up = (torch.randn(out_f, rank, generator=gen) * 0.1).bfloat16()
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha).bfloat16()
        parts[module] = (down, up, alpha or rank)  # alpha absent or 0 -> rank (no scaling), as kohya
    save_file(state, str(path))
    return parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_changes_exactly_the_targeted_weights(tmp_path: Path, dtype: torch.dtype) -> None:
    base = Step1XEditPipeline.random("tiny", seed=0, dtype=dtype).model
    path = tmp_path / "hand.safetensors"
    parts = write_kohya(base, path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = Step1XEditPipeline.random("tiny", seed=0, dtype=dtype, loras=[LoraSpec.parse(f"{path}:0.5")]).model
    after = merged.state_dict()
    targeted = {f"{m}.weight" for m in parts}
    for key, value in after.items():
        if key not in targeted:
            assert torch.equal(value, before[key]), f"{key} changed but no LoRA layer targets it"
    for module, (down, up, alpha) in parts.items():
        key = f"{module}.weight"
        rank = down.shape[0]
        expected = (before[key].float() + 0.5 * (up.float() @ down.float()) * (alpha / rank)).to(dtype)
        assert after[key].dtype == dtype and torch.equal(after[key], expected), key
        assert not torch.equal(after[key], before[key]), key


def test_scale_parsing() -> None:
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec(Path("a/b.safetensors"), 1.0)
    assert LoraSpec.parse("a/b.safetensors:0.8") == LoraSpec(Path("a/b.safetensors"), 0.8)
    assert LoraSpec.parse("C:/x/b.safetensors:-1") == LoraSpec(Path("C:/x/b.safetensors"), -1.0)
    assert LoraSpec.parse("weird:name.safetensors") == LoraSpec(Path("weird:name.safetensors"), 1.0)


def test_mismatched_lora_is_refused_naming_its_keys(tmp_path: Path) -> None:
    model = Step1XEditPipeline.random("tiny", seed=0).model
    bad = tmp_path / "bad.safetensors"
    write_kohya(model, bad, LAYERS[:1])
    state = load_file(str(bad))
    state["lora_unet_connector_global_proj_out.lora_down.weight"] = torch.zeros(2, 64)
    state["lora_unet_connector_global_proj_out.lora_up.weight"] = torch.zeros(64, 2)
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 2)
    save_file(state, str(bad))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match=r"2 layers match no module.*text-encoder.*lora_te1_text_model_encoder_layers_0"
                                        r"_mlp_fc1, lora_unet_connector_global_proj_out"):
        merge_lora(model, LoraSpec(bad))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-merged

    wrong = tmp_path / "wrong.safetensors"
    save_file({"lora_unet_txt_in.lora_down.weight": torch.zeros(2, 65),
               "lora_unet_txt_in.lora_up.weight": torch.zeros(64, 2)}, str(wrong))
    with pytest.raises(LoraError, match=r"lora_unet_txt_in: LoRA \(64, 65\), weight \(64, 64\)"):
        merge_lora(model, LoraSpec(wrong))
    odd = tmp_path / "dora.safetensors"
    save_file({"lora_unet_txt_in.dora_scale": torch.zeros(1, 64)}, str(odd))
    with pytest.raises(LoraError, match=r"not lora_down/lora_up/alpha: lora_unet_txt_in\.dora_scale"):
        merge_lora(model, LoraSpec(odd))

    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src)
    result = CliRunner().invoke(main, ["edit", "--model", "tiny", "--lora", str(bad), "--image", str(src),
                                       "--prompt", "x", "--out", str(out), "--steps", "1", "--quiet"])
    assert result.exit_code == 1 and "lora_unet_connector_global_proj_out" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_edit_cli_with_lora_equals_the_merged_reference(tmp_path: Path) -> None:
    model = Step1XEditPipeline.random("tiny", seed=0).model
    path = tmp_path / "style.safetensors"
    write_kohya(model, path, seed=1)
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    image = Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    image.save(src)
    result = CliRunner().invoke(main, ["edit", "--model", "tiny", "--lora", f"{path}:0.7", "--lora", f"{path}:-0.2",
                                       "--image", str(src), "--prompt", "add a hat", "--out", str(out),
                                       "--steps", "2", "--size-level", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    specs = [LoraSpec(path, 0.7), LoraSpec(path, -0.2)]
    reference = Step1XEditPipeline.random("tiny", seed=0, loras=specs).edit(image, "add a hat", steps=2, size_level=32)
    plain = Step1XEditPipeline.random("tiny", seed=0).edit(image, "add a hat", steps=2, size_level=32)
    got = np.asarray(Image.open(out))
    assert np.array_equal(got, np.asarray(reference))
    assert not np.array_equal(got, np.asarray(plain))
    with pytest.raises(ValueError, match="--lora applies to the torch backend"):
        Step1XEditRuntime.load(tmp_path, "onnxruntime", device="cpu", loras=specs)


def test_export_with_lora_holds_the_merged_weights_under_refittable_names(tmp_path: Path) -> None:
    model = Step1XEditPipeline.random("tiny", seed=0).model
    path = tmp_path / "hand.safetensors"
    write_kohya(model, path)
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--model", "tiny", "--lora", str(path), "--components", "dit",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).loras == [{"file": "hand.safetensors", "sha256": file_sha256(path), "multiplier": 1.0}]
    assert "merged LoRA hand.safetensors x 1" in result.output
    merged = Step1XEditPipeline.random("tiny", seed=0, loras=[LoraSpec(path)]).model
    changed = merge_lora(Step1XEditPipeline.random("tiny", seed=0).model, LoraSpec(path))
    shapes = {n: merged.get_parameter(n).shape for n in changed}
    names = refit_names(out / "dit.onnx", shapes)
    graph = {i.name: i for i in onnx.load(str(out / "dit.onnx")).graph.initializer}
    for torch_name, onnx_name in names.items():
        assert np.array_equal(numpy_helper.to_array(graph[onnx_name]), merged.get_parameter(torch_name).numpy())
    with pytest.raises(ExportError, match=r"connector\.global_proj_out\.weight.*rebuild"):
        refit_names(out / "dit.onnx", {"connector.global_proj_out.weight": torch.Size([1])})
