"""Calibration set, statistics, recipes, artifact and the torch W8A8 path (tiny model, CPU emulation)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from step1x_export.calibrate.apply import quantize_model
from step1x_export.calibrate.artifact import ArtifactError, QuantArtifact, load_artifact, save_artifact
from step1x_export.calibrate.collect import StatsCollector, collect_stats
from step1x_export.calibrate.dataset import TASKS, calibration_pairs, describe, load_pair_image, split_pairs
from step1x_export.calibrate.evaluate import evaluate, format_table, sqnr_db, summarize
from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qlinear import Kernel, QuantLinear, select_kernel
from step1x_export.calibrate.recipes import DEFAULT_EXCLUDE, build_artifact, select_layers, smoothing_factors
from step1x_export.hashing import module_hash
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

pytestmark = pytest.mark.xdist_group("calibrate")  # the calibrated artifacts are made once, on one worker

STEPS, SIZE = 4, 64
# Measured on the tiny random model (4 calibration pairs, 4 steps, size 64, 2 held-out pairs):
# fp8 SQNR/step mean 39.6 dB, min 39.0, image PSNR 57.5; int8-sq (alpha 0.5) 51.2, 49.9, 61.9.
FLOORS = {"fp8": {"sqnr_mean": 37.0, "sqnr_min": 36.0, "psnr_mean": 54.0},
          "int8-sq": {"sqnr_mean": 48.0, "sqnr_min": 47.0, "psnr_mean": 58.0}}


@pytest.fixture(scope="module")
def pipe() -> Step1XEditPipeline:
    return Step1XEditPipeline.random("tiny", seed=0)


@pytest.fixture(scope="module")
def stats(pipe):
    calib, _ = split_pairs()
    return collect_stats(pipe, calib[:4], steps=STEPS, size_level=SIZE, progress=False)


# -- data set ------------------------------------------------------------------------------------

def test_calibration_set_covers_tasks_and_languages():
    pairs = calibration_pairs()
    assert len(pairs) >= 64
    assert {p.task for p in pairs} == set(TASKS) and len(TASKS) == 11
    for lang in ("en", "zh"):
        assert {p.task for p in pairs if p.language == lang} == set(TASKS)
    assert sum('"' in p.instruction for p in pairs) >= 4  # quoted text is re-tokenised by the embedder
    calib, held = split_pairs()
    assert held and len(calib) + len(held) == len(pairs)
    assert not {p.key for p in calib} & {p.key for p in held}
    assert {p.language for p in held} == {"en", "zh"}
    assert split_pairs() == (calib, held)  # deterministic
    assert describe(calib)["pairs"] == len(calib)
    for name in sorted({p.image for p in pairs}):
        image = load_pair_image(next(p for p in pairs if p.image == name))
        assert image.mode == "RGB" and min(image.size) >= 64


# -- statistics and recipes ---------------------------------------------------------------------

def test_stats_cover_every_linear_input(pipe, stats):
    linears = [n for n, m in pipe.model.named_modules() if isinstance(m, nn.Linear)]
    assert set(stats) == set(linears)
    # every step of every pair: 4 pairs x 4 steps calls (the DiT runs cond + uncond as one batch)
    assert stats["double_blocks.0.img_attn.qkv"].calls == 4 * STEPS
    for name, s in stats.items():
        k = dict(pipe.model.named_modules())[name].in_features
        assert s.channel_amax.shape == (k,) and torch.isfinite(s.channel_amax).all() and s.amax > 0



def test_stats_collector_refuses_nonfinite_inputs():
    # The finiteness check runs once when collection ends (no GPU sync per Linear call); it names the layer.
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    x = torch.ones(5, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"input of \['0'\].*inf/NaN"), StatsCollector(model, ["0"]).active():
        model(x)
    collector = StatsCollector(model)
    with collector.active():
        model(torch.ones(5, 4))
    assert set(collector.stats) == {"0", "1"} and float(collector.stats["0"].amax) == 1.0


def test_layer_selection_patterns():
    names = ["img_in", "double_blocks.0.img_mod.lin", "double_blocks.0.img_attn.qkv", "single_blocks.1.linear2",
             "single_blocks.1.modulation.lin", "final_layer.linear", "connector.S.input_embedder"]
    assert select_layers(names, ("*",), DEFAULT_EXCLUDE) == ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"]
    assert select_layers(names, (r"re:single_blocks\.\d+\.linear\d",), ()) == ["single_blocks.1.linear2"]


def test_smoothing_balances_activation_and_weight():
    x_amax, w = torch.tensor([8.0, 1.0, 0.5]), torch.tensor([[2.0, 1.0, 4.0], [1.0, 0.5, 1.0]])
    s = smoothing_factors(x_amax, w, alpha=0.5)
    # alpha 0.5: after smoothing, activation and weight column amax are equal: sqrt(amax_x * amax_w)
    torch.testing.assert_close(x_amax / s, (w * s).abs().amax(0))
    torch.testing.assert_close(x_amax / s, (x_amax * w.abs().amax(0)).sqrt())


# -- quantized Linear ---------------------------------------------------------------------------

def _reference_qlinear(x, lin, fmt, in_scale, w_scale, smooth):
    """Written out independently of the package: Q/DQ formula of ONNX / TensorRT."""
    qmax = 448.0 if fmt == "fp8_e4m3" else 127.0
    xs = x / smooth if smooth is not None else x
    w = lin.weight * smooth if smooth is not None else lin.weight
    w_s = w_scale[:, None] if w_scale.numel() > 1 else w_scale
    if fmt == "fp8_e4m3":
        xq = (xs / in_scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
        wq = (w / w_s).clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
    else:
        xq = torch.round(xs / in_scale).clamp(-128, 127)
        wq = torch.round(w / w_s).clamp(-127, 127)
    return (xq * in_scale) @ (wq * w_s).T + lin.bias


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("smoothed", [False, True])
def test_qlinear_emulation_matches_formula(fmt, per_channel, smoothed):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(48, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 48, generator=g) * 0.2)
    x = torch.randn(5, 7, 48, generator=g) * torch.linspace(0.2, 6.0, 48)  # channel outliers
    smooth = smoothing_factors(x.abs().amax((0, 1)), lin.weight, 0.5) if smoothed else None
    xs = x / smooth if smoothed else x
    f = QuantFormat(fmt)
    w = lin.weight.detach() * smooth if smoothed else lin.weight.detach()
    in_scale = xs.abs().max() / f.qmax
    w_scale = (w.abs().amax(1) if per_channel else w.abs().max().reshape(1)) / f.qmax
    q = QuantLinear.from_linear(lin, f, input_scale=in_scale, weight_scale=w_scale, smooth=smooth)
    assert q.kernel is Kernel.EMULATE and f"format={fmt}" in repr(q) and q.weight.dtype == f.storage_dtype
    with torch.no_grad():
        got, want, exact = q(x), _reference_qlinear(x, lin, fmt, in_scale, w_scale, smooth), lin(x)
    # Emulation = the formula up to float32 summation order; the quantization error itself is larger.
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-6, rel
    assert sqnr_db(exact, got) > (24 if fmt == "fp8_e4m3" else 30)


def test_kernel_choice_is_emulation_off_gpu():
    assert select_kernel(QuantFormat.FP8_E4M3, torch.device("cpu"), 64, 64) is Kernel.EMULATE
    assert select_kernel(QuantFormat.INT8, torch.device("cpu"), 64, 64) is Kernel.EMULATE


# -- artifact -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(pipe, stats) -> dict[str, QuantArtifact]:
    calib = describe(split_pairs()[0][:4]) | {"steps": STEPS, "size_level": SIZE}
    return {r: build_artifact(pipe.model, stats, r, calibration=calib) for r in ("fp8", "int8-sq")}


def test_artifact_round_trip(artifacts, tmp_path):
    for recipe, a in artifacts.items():
        path = save_artifact(a, tmp_path / f"{recipe}.safetensors")
        b = load_artifact(path)
        assert (b.recipe, b.fmt, b.alpha, b.model_hash, b.include, b.exclude, b.calibration) == (
            a.recipe, a.fmt, a.alpha, a.model_hash, a.include, a.exclude, a.calibration)
        # double blocks: qkv, proj, mlp.0, mlp.2 per stream; single blocks: linear1, linear2
        assert list(b.layers) == list(a.layers) and len(a.layers) == 2 * 2 * 4 + 2 * 2
        for name, s in a.layers.items():
            t = b.layers[name]
            assert torch.equal(t.input_scale, s.input_scale) and torch.equal(t.weight_scale, s.weight_scale)
            assert (t.smooth is None) == (s.smooth is None) == (recipe == "fp8")
            if s.smooth is not None:
                assert torch.equal(t.smooth, s.smooth)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_artifact_errors(artifacts, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_artifact(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ArtifactError, match="not a step1x-export quantization artifact"):
        load_artifact(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_artifact(tmp_path / "junk.safetensors")
    a = artifacts["fp8"]
    a2 = copy.copy(a)
    a2.format_version = 99
    save_artifact(a2, tmp_path / "v99.safetensors")
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(tmp_path / "v99.safetensors")


def test_artifact_refuses_other_model(pipe, artifacts):
    other = Step1XEditPipeline.random("tiny", seed=1).model
    with pytest.raises(ValueError, match="calibrated on model") as err:
        quantize_model(other, artifacts["fp8"])
    assert artifacts["fp8"].model_hash in str(err.value) and module_hash(other) in str(err.value)
    # the same weights in another dtype are another model too
    with pytest.raises(ValueError, match="calibrated on model"):
        quantize_model(copy.deepcopy(pipe.model).to(torch.bfloat16), artifacts["fp8"])


# -- accuracy against the fp32 reference -------------------------------------------------------

@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
def test_quantized_dit_accuracy(pipe, artifacts, recipe):
    qmodel = quantize_model(copy.deepcopy(pipe.model), artifacts[recipe])
    n_q = sum(isinstance(m, QuantLinear) for m in qmodel.modules())
    assert n_q == len(artifacts[recipe].layers)
    _, held = split_pairs()
    reports = evaluate(pipe, qmodel, held[:2], steps=STEPS, size_level=SIZE, progress=False)
    summary = summarize(reports)
    print("\n" + format_table({recipe: summary}))
    assert all(len(r.step_sqnr) == STEPS for r in reports)
    for key, floor in FLOORS[recipe].items():
        assert summary[key] > floor, (key, summary)
    assert math.isfinite(summary["psnr_min"])
    json.dumps(summary)


# -- export --quant: the artifact as explicit Q/DQ in the exported dit graph ------------------------

def test_export_with_quant_matches_torch_w8a8(pipe, artifacts, tmp_path):
    from test_quant_onnx import _inputs

    from step1x_export.export import export_components, load_manifest
    from step1x_export.precision import Precision
    from step1x_export.runtime.engines.onnxruntime import OrtEngine

    other = Step1XEditPipeline.random("tiny", seed=1)
    with pytest.raises(ValueError, match="calibrated on model"):  # refused before anything is written
        export_components(other, tmp_path / "refused", components=["dit"], quant=artifacts["fp8"], progress=False)
    assert not (tmp_path / "refused").exists()

    manifest = export_components(pipe, tmp_path / "fp8", components=["dit"], quant=artifacts["fp8"], progress=False)
    assert load_manifest(tmp_path / "fp8").components["dit"].precision is Precision.FP8
    engine = OrtEngine.from_manifest(manifest, "dit", providers=["CPUExecutionProvider"])
    inputs = _inputs()
    got = engine(**inputs)["pred"]
    qmodel = quantize_model(copy.deepcopy(pipe.model), artifacts["fp8"])
    with torch.no_grad():
        want = qmodel(*inputs.values())
        full = pipe.model(*inputs.values())
    agree, quality = sqnr_db(want, got), sqnr_db(full, got)
    print(f"export --quant fp8: ORT Q/DQ graph vs torch W8A8 {agree:.1f} dB; vs fp32 {quality:.1f} dB")
    assert agree > 50 and quality > 30
