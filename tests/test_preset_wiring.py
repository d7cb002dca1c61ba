"""The card-size presets run the runtime's streaming and 4-bit pieces: a streamed preset's resident blocks and
prefetch reach the DiT loader alike from the API and the CLI (unless given), the 8gb preset runs its 4-bit MLLM
and 4-bit DiT checkpoint and asks for one when given an 8-bit checkpoint, and a streamed preset's edit is its
all-resident edit bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qcheckpoint import WEIGHT_ONLY_DEFAULT, write_quantized_checkpoint
from step1x_export.cli import main
from step1x_export.cli.runtime_options import RuntimeArgs
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime, loaders
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.weights.random_weights import randomize_

EDIT = {"seed": 0, "steps": 2, "size_level": 32}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny DiT (seed 0, fp32: what `load("tiny")` builds on CPU) quantized 8-bit weight-only and with its
    blocks in 4 bits."""
    root = tmp_path_factory.mktemp("q")
    src = root / "dit.safetensors"
    model = randomize_(Step1XEdit(get_config("tiny")), 0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    out = {"int8": root / "int8.safetensors", "int4": root / "int4.safetensors"}
    for name, int4 in (("int8", ()), ("int4", ("double_blocks.*", "single_blocks.*"))):
        write_quantized_checkpoint(src, "tiny", out[name], weight_only=WEIGHT_ONLY_DEFAULT,
                                   weight_only_format=QuantFormat.INT8, int4=int4,
                                   dtype=torch.float32)
    return out


@pytest.fixture
def streams(monkeypatch) -> list[tuple[int, int]]:
    """(resident, ahead) of every DiT the loaders stream."""
    calls: list[tuple[int, int]] = []
    original = loaders.streamed_dit

    def record(model, device, *, resident: int, ahead: int):
        calls.append((resident, ahead))
        return original(model, device, resident=resident, ahead=ahead)

    monkeypatch.setattr(loaders, "streamed_dit", record)
    return calls


def test_a_streamed_preset_sets_its_blocks_unless_given():
    sixteen = RuntimeOptions(preset="16gb")
    assert (sixteen.resident_blocks, sixteen.prefetch_blocks, sixteen.mllm_quant) == (40, 2, "int8")
    given = RuntimeOptions(preset="12gb", resident_blocks=1, prefetch_blocks=1)  # 1 is also the plain default
    assert (given.resident_blocks, given.prefetch_blocks) == (1, 1)
    assert RuntimeOptions(preset="12gb", resident_blocks=1).prefetch_blocks == 2
    assert RuntimeOptions(preset="24gb").resident_blocks is None
    assert RuntimeOptions().resolved(torch.device("cpu")).prefetch_blocks == 1  # unset, no preset: 1
    assert RuntimeOptions(preset="8gb").mllm_quant == "int4"


def test_a_streamed_preset_runs_alike_from_the_api_and_the_cli(checkpoints, streams, tmp_path):
    """12gb scaled to tiny (1 block resident; the preset's prefetch 2): the API and `edit --preset 12gb
    --resident-blocks 1` stream the same way and write the same image, which is the all-resident edit's."""
    png, out = tmp_path / "in.png", tmp_path / "out.png"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    image.save(png)
    q = checkpoints["int8"]
    rt = Step1XEditRuntime.load("tiny", quant=q, device="cpu", preset="12gb", resident_blocks=1)
    with rt:
        assert (rt.options.resident_blocks, rt.options.prefetch_blocks, rt.options.sequential_load) == (1, 2, "host")
        api = rt.edit(image, "add a hat", **EDIT)
    assert streams == [(1, 2)]
    run = CliRunner().invoke(main, ["edit", "--model", "tiny", "--image", str(png), "--prompt", "add a hat", "--out",
                                    str(out), "--steps", "2", "--size-level", "32", "--seed", "0", "--device", "cpu",
                                    "--quiet", "--preset", "12gb", "--resident-blocks", "1", "--quant", str(q)])
    assert run.exit_code == 0, run.output
    assert streams == [(1, 2), (1, 2)]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))
    with Step1XEditRuntime.load("tiny", quant=q, device="cpu", mllm_quant="int8", sequential_load=True,
                                cuda_graphs=False) as resident:
        assert np.array_equal(np.asarray(resident.edit(image, "add a hat", **EDIT)), np.asarray(api))
    assert len(streams) == 2
    args = RuntimeArgs(model_name="tiny", quant=q, preset="16gb", prefetch_blocks=3)
    assert args.options() == RuntimeOptions(preset="16gb", prefetch_blocks=3)


def test_the_8gb_preset_runs_4bit_weights_and_asks_for_them(checkpoints, streams):
    image = Image.new("RGB", (48, 40), (40, 160, 90))
    with pytest.raises(ValueError, match=r"preset 8gb plans the DiT's blocks in 4 bits; --quant .*int8.safetensors "
                                         r"is a checkpoint without 4-bit layers: make one with `step1x-export "
                                         r"quantize --model-dir DIR --int4-layers 'double_blocks\.\*'"):
        Step1XEditRuntime.load("tiny", quant=checkpoints["int8"], device="cpu", preset="8gb", resident_blocks=1)
    with pytest.raises(ValueError, match="is no quantized checkpoint"):
        Step1XEditRuntime.load("tiny", device="cpu", preset="8gb", resident_blocks=1)
    latents = []
    for fields in ({"preset": "8gb", "resident_blocks": 1},
                   {"mllm_quant": "int4", "sequential_load": "host", "cuda_graphs": False}):
        with Step1XEditRuntime.load("tiny", quant=checkpoints["int4"], device="cpu", **fields) as rt:
            rt.edit(image, "add a hat", **EDIT)
            latents.append(rt.last_latent)
    assert streams == [(1, 2)]
    assert torch.equal(latents[0], latents[1])  # the preset = its fields by hand, every block resident


def test_the_4bit_mllm_keeps_layers_no_group_divides_in_8_bits():
    """Qwen2.5-VL-7B's vision MLP down projections are 3420 wide (no group of 128, 64 or 32 divides it): 8-bit
    weight-only there, 4 bits elsewhere, as the 8gb plan counts them (`plan.weights.bytes_as`)."""
    from types import SimpleNamespace

    from torch import nn

    from step1x_export.calibrate.int4 import Int4Linear
    from step1x_export.calibrate.weight_only import WeightOnlyLinear
    from step1x_export.runtime.engines.mllm import prepare_mllm

    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.down_proj, block.mlp.up_proj = nn.Linear(3420, 16), nn.Linear(128, 16)
    model = nn.Module()
    model.model = nn.Module()
    model.model.visual = nn.Module()
    model.model.visual.blocks = nn.ModuleList([block])
    prepare_mllm(SimpleNamespace(model=model), "int4")  # type: ignore[arg-type]
    assert isinstance(block.mlp.down_proj, WeightOnlyLinear) and isinstance(block.mlp.up_proj, Int4Linear)
