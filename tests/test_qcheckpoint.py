"""Quantized checkpoints: streamed from a float (or FP8-stored) DiT file, loaded into the runtime as 8-bit tensors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from wide_model import wide_config

from step1x_export.calibrate.apply import quantize_model
from step1x_export.calibrate.artifact import save_artifact
from step1x_export.calibrate.collect import InputStats
from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qcheckpoint import (
    WEIGHT_ONLY_DEFAULT,
    load_quantized_checkpoint,
    read_qcheckpoint_info,
    write_quantized_checkpoint,
)
from step1x_export.calibrate.qlinear import QuantLinear
from step1x_export.calibrate.recipes import build_artifact
from step1x_export.calibrate.weight_only import WeightOnlyLinear, quantize_weights_
from step1x_export.hashing import file_identity
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.safetensors_io import SafetensorsIOError, TensorInfo, TensorReader, stream_safetensors
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.weights.loading import CheckpointError, load_into
from step1x_export.step1x_ref.weights.random_weights import randomize_

ROOT = Path(__file__).resolve().parents[1]
EDIT = {"seed": 0, "steps": 2, "size_level": 32}


def tiny_dit(config: str, seed: int) -> nn.Module:
    """The DiT `Step1XEditPipeline.random(config, seed=seed)` holds, without building the rest."""
    return randomize_(Step1XEdit(get_config(config)), seed).eval().requires_grad_(False)


def synthetic_artifact(model: nn.Module, recipe: str):
    """Scales from random per-channel activation amax (the layout and maths are what is under test)."""
    gen = torch.Generator().manual_seed(0)
    stats = {n: InputStats(torch.rand(m.in_features, generator=gen) * 4 + 0.1)
             for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return build_artifact(model, stats, recipe)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tiny DiT (seed 0, fp32: what `Step1XEditRuntime.load("tiny")` builds on CPU) as a checkpoint file."""
    path = tmp_path_factory.mktemp("src") / "dit.safetensors"
    model = tiny_dit("tiny", 0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def held_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
def test_checkpoint_loads_as_8bit_and_edits_like_the_artifact_path(source, tmp_path, recipe):
    reference = tiny_dit("tiny", 0)
    artifact = synthetic_artifact(reference, recipe)
    art_path, q_path = tmp_path / "scales.safetensors", tmp_path / "dit-q.safetensors"
    save_artifact(artifact, art_path)
    info = write_quantized_checkpoint(source, "tiny", q_path, artifact=artifact)
    assert info.source == file_identity(source).as_dict() and info.quant["recipe"] == recipe

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    with Step1XEditRuntime.load("tiny", quant=q_path, device="cpu") as rt:
        dit = rt.stages.resident["dit"].module
        quantized = {n: m for n, m in dit.named_modules() if isinstance(m, QuantLinear)}
        assert set(quantized) == set(artifact.layers)
        storage = QuantFormat(artifact.fmt).storage_dtype
        assert all(m.weight.dtype == storage for m in quantized.values())
        assert not any(isinstance(m, nn.Linear) and n in artifact.layers for n, m in dit.named_modules())
        # The device holds exactly the file's tensors: no float copy of any quantized layer.
        file_bytes = sum(i.nbytes for i in TensorReader(q_path).infos.values())
        # fp32 weights (4 bytes) -> 1 byte each, plus float32 scales: input [], weight [N], smooth_inv [K].
        saved = sum(3 * m.weight.numel() - 4 * (1 + m.out_features + (m.in_features if m.smooth_inv is not None
                                                                      else 0)) for m in quantized.values())
        assert held_bytes(dit) == file_bytes == held_bytes(reference) - saved
        got = np.asarray(rt.edit(image, "add a hat", **EDIT))
    with Step1XEditRuntime.load("tiny", quant=art_path, device="cpu") as rt:
        want = np.asarray(rt.edit(image, "add a hat", **EDIT))
    np.testing.assert_array_equal(got, want)  # the same 8-bit weights and the same emulated GEMMs


def test_weight_only_layers_and_fp8_stored_source(tmp_path):
    """The v1.0 FP8-stored file's layout (weights float8_e4m3fn, no scales) is quantized layer by layer."""
    model = tiny_dit("tiny-v1.0", 1)
    fp8_src = tmp_path / "dit-fp8.safetensors"
    save_file({k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v).contiguous()
               for k, v in model.state_dict().items()}, str(fp8_src))
    q_path = tmp_path / "q.safetensors"
    info = write_quantized_checkpoint(fp8_src, "tiny-v1.0", q_path, weight_only=WEIGHT_ONLY_DEFAULT,
                                      weight_only_format=QuantFormat.INT8, dtype=torch.float32)
    assert info.layout.weight_only and all(n.startswith("connector.") or n.endswith("lin")
                                           for n in info.layout.weight_only)
    loaded, _ = load_quantized_checkpoint(q_path, "cpu", torch.float32)
    # The same as loading the whole file upcast (what `load_into` does) and quantizing in memory.
    upcast = load_into(lambda: Step1XEdit(get_config("tiny-v1.0")), fp8_src, dtype=torch.float32)
    want = quantize_weights_(upcast, list(info.layout.weight_only), QuantFormat.INT8)
    a, b = loaded.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert all(isinstance(loaded.get_submodule(n), WeightOnlyLinear) for n in info.layout.weight_only)


def test_checkpoint_mismatches_are_one_line_errors(source, tmp_path):
    model = tiny_dit("tiny", 0)
    artifact = synthetic_artifact(model, "fp8")
    artifact.source = {"file": "other.safetensors", "size": 1, "sha256": "0" * 64}
    with pytest.raises(ValueError, match="calibrated on other.safetensors"):
        write_quantized_checkpoint(source, "tiny", tmp_path / "q.safetensors", artifact=artifact)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="does not match the model"):
        write_quantized_checkpoint(source, "tiny-v1.0", tmp_path / "q.safetensors", weight_only=("*",),
                                   weight_only_format=QuantFormat.FP8_E4M3)
    q = tmp_path / "q.safetensors"
    info = write_quantized_checkpoint(source, "tiny", q, weight_only=("*_mod.lin",),
                                      weight_only_format=QuantFormat.FP8_E4M3)
    assert info.dtype == torch.bfloat16  # without an artifact: bf16, the dtype the runtime computes in
    with pytest.raises(ValueError, match="load it with dtype bfloat16"):
        load_quantized_checkpoint(q, "cpu", torch.float32)
    assert read_qcheckpoint_info(source) is None  # a plain checkpoint is not a quantized one


def test_stream_writer_output_reads_back_and_checks_its_header(tmp_path):
    tensors = {"a.weight": torch.randn(3, 5), "a.q": torch.randint(-100, 100, (7,), dtype=torch.int8),
               "b.w": torch.randn(4, 4).to(torch.float8_e4m3fn), "b.h": torch.randn(2).bfloat16()}
    path = tmp_path / "x.safetensors"
    with stream_safetensors(path, {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                            {"k": "v"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), v.view(torch.uint8))
    with pytest.raises(SafetensorsIOError, match="declared"), \
            stream_safetensors(tmp_path / "y.safetensors", {"a": TensorInfo(torch.float32, (2,))}) as w:
        w.write("a", torch.zeros(3))
    with pytest.raises(SafetensorsIOError, match="0 of 1"), \
            stream_safetensors(tmp_path / "y.safetensors", {"a": TensorInfo(torch.float32, (2,))}):
        pass
    assert not (tmp_path / "y.safetensors").exists()


RSS_CHILD = """
import json, resource, sys
from dataclasses import replace
import torch
from step1x_export.calibrate.artifact import LayerScales, QuantArtifact
from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qcheckpoint import WEIGHT_ONLY_DEFAULT, write_quantized_checkpoint
from step1x_export.calibrate.recipes import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, select_layers
from step1x_export.step1x_ref.dit.model import Step1XEdit
from wide_model import wide_config

config = wide_config()
with torch.device("meta"):
    model = Step1XEdit(config)
linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
layers = {n: LayerScales(linears[n].in_features, linears[n].out_features, torch.tensor(0.01),
                         torch.full((linears[n].out_features,), 1e-3))
          for n in select_layers(list(linears), DEFAULT_INCLUDE, DEFAULT_EXCLUDE)}
artifact = QuantArtifact("fp8", QuantFormat.FP8_E4M3, "synthetic", "bfloat16", layers, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)
del model, linears
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
write_quantized_checkpoint(sys.argv[1], config, sys.argv[2], artifact=artifact, weight_only=WEIGHT_ONLY_DEFAULT,
                           weight_only_format=QuantFormat.FP8_E4M3)
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_streaming_a_1gb_checkpoint_keeps_host_memory_near_one_layer(tmp_path):
    src, out = tmp_path / "wide.safetensors", tmp_path / "wide-q.safetensors"
    with torch.device("meta"):
        state = Step1XEdit(wide_config()).state_dict()
    gen = torch.Generator().manual_seed(0)
    with stream_safetensors(src, {k: TensorInfo(torch.bfloat16, tuple(v.shape)) for k, v in state.items()}) as w:
        for k, v in state.items():  # one tensor at a time: the test never holds the model either
            w.write(k, torch.empty(v.shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen))
    assert src.stat().st_size >= 1e9
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(src), str(out)], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    quantized = out.stat().st_size
    largest_fp32 = max(v.numel() for v in state.values()) * 4  # single_blocks.0.linear1: 21504 x 3072
    # Stated overhead: the process before quantizing (interpreter, torch: `base`) plus two float32 copies of the
    # largest layer (its bytes as read, and the float32 product it is quantized from).
    assert r["peak"] < quantized + r["base"]
    assert r["peak"] - r["base"] < 2 * largest_fp32, (r, quantized)
    print(f"quantized {quantized / 2**20:.0f} MiB, base {r['base'] / 2**20:.0f} MiB, peak {r['peak'] / 2**20:.0f} MiB")
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("single_blocks.0.linear1.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("single_blocks.0.modulation.lin.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("img_in.weight").get_dtype() == "BF16"


def test_file_identity_is_cached_and_follows_changes(tmp_path, monkeypatch):
    from step1x_export import hashing

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 1000)
    first = file_identity(path)
    assert (tmp_path / "w.safetensors.sha256.json").is_file()
    monkeypatch.setattr(hashing, "file_sha256", lambda p: pytest.fail("hashed again"))
    assert file_identity(path) == first  # from the cache: no read of the file
    monkeypatch.undo()
    path.write_bytes(b"y" * 1000)  # same size, new mtime
    assert file_identity(path).sha256 != first.sha256


def test_artifact_source_is_checked_by_file_identity(source):
    model = load_into(lambda: Step1XEdit(get_config("tiny")), source, dtype=torch.float32)
    artifact = synthetic_artifact(model, "fp8")
    artifact.source = file_identity(source).as_dict()
    quantize_model(copy.deepcopy(model), artifact, source=file_identity(source))  # no tensor hashing
    artifact.source = {"file": "x", "sha256": "f" * 64}
    with pytest.raises(ValueError, match="recalibrate"):
        quantize_model(model, artifact, source=file_identity(source))


def test_quantize_then_edit_with_the_24gb_preset_from_the_cli(source, tmp_path):
    from click.testing import CliRunner

    from step1x_export.cli import main

    q, png, out = tmp_path / "q.safetensors", tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(png)
    run = CliRunner().invoke(main, ["quantize", "--checkpoint", str(source), "--version", "tiny", "--weight-only",
                                    "int8", "--dtype", "fp32", "--out", str(q), "--quiet"])
    assert run.exit_code == 0, run.output
    assert "0 W8A8 layers" in run.output and "22 weight-only layers (int8)" in run.output
    edit = ["edit", "--model", "tiny", "--image", str(png), "--prompt", "add a hat", "--out", str(out), "--steps", "2",
            "--size-level", "32", "--device", "cpu", "--quiet"]
    run = CliRunner().invoke(main, [*edit, "--preset", "24gb"])
    assert run.exit_code == 2 and "needs --quant FILE, a quantized checkpoint" in run.output
    run = CliRunner().invoke(main, [*edit, "--preset", "24gb", "--quant", str(q)])
    assert run.exit_code == 0, run.output
    assert Image.open(out).size == (48, 40)


def _with_metadata(src: Path, out: Path, edit) -> Path:
    """A copy of quantized checkpoint `src` whose header metadata went through `edit(dict) -> dict | str`."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    key = "step1x_export.qcheckpoint"
    changed = edit(json.loads(meta[key]))
    meta[key] = changed if isinstance(changed, str) else json.dumps(changed)
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: {**d, "config": "flux-dev"}, r"\$\.config: 'flux-dev' is not one of"),
    (lambda d: {**d, "dtype": "float64"}, r"\$\.dtype"),
    (lambda d: {k: v for k, v in d.items() if k != "layout"}, "'layout' is a required property"),
    (lambda d: {**d, "layout": {**d["layout"], "weight_only": "*"}}, r"\$\.layout\.weight_only: '\*' is not of type"),
    (lambda d: {**d, "layout": {**d["layout"], "w8a8_format": "int4"}}, r"\$\.layout\.w8a8_format"),
    (lambda d: {**d, "format_version": 99}, "version 99, this step1x-export reads 1"),
    (lambda d: '{"config": NaN}', "not a number a manifest may hold"),
])
def test_damaged_checkpoint_metadata_is_refused_naming_the_field(source, tmp_path, edit, message):
    q = tmp_path / "q.safetensors"
    write_quantized_checkpoint(source, "tiny", q, weight_only=("*_mod.lin",), weight_only_format=QuantFormat.FP8_E4M3)
    assert read_qcheckpoint_info(q).config == "tiny"
    bad = _with_metadata(q, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized_checkpoint(bad, "cpu")
