"""Artifact -> ONNX Q/DQ: the graph ONNX Runtime runs on CPU agrees with the torch W8A8 modules.

The graph's meaning is checked with ONNX Runtime's graph optimizations off: every QuantizeLinear /
DequantizeLinear runs as defined and the MatMuls in float32, on any CPU. With optimizations on, ORT fuses
Q/DQ into int8 kernels chosen by the CPU's vector ISA (exact with VNNI, lossy without it: int16
saturation on AVX2): that is ORT's kernel choice, not the graph's meaning, and it is reported per machine by
`benchmarks/ort_int8_kernels.py` instead of asserted here.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from step1x_export.calibrate.apply import quantize_model
from step1x_export.calibrate.collect import StatsCollector
from step1x_export.calibrate.evaluate import sqnr_db
from step1x_export.calibrate.onnx_qdq import insert_qdq
from step1x_export.calibrate.recipes import build_artifact
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.math import rope_table
from step1x_export.step1x_ref.dit.model import Step1XEdit
from step1x_export.step1x_ref.sampling import position_ids
from step1x_export.step1x_ref.weights.random_weights import randomize_

pytestmark = pytest.mark.xdist_group("quant_onnx")  # one export of the DiT graph serves every test here

CONFIG = get_config("tiny")


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, txt = 16, CONFIG.embedder.max_length  # a 64x64 edit: 4x4 tokens per half
    mask = torch.zeros(2, txt, dtype=torch.int64)
    mask[:, :40] = 1
    return {
        "img": torch.randn(2, 2 * n, 64, generator=g),
        "pe": rope_table(position_ids(txt, 4, 4, CONFIG.version), CONFIG.dit.axes_dim, CONFIG.dit.theta),
        "timestep": torch.tensor([0.7, 0.7]),
        "llm_embedding": torch.randn(2, txt, 64, generator=g) * mask[..., None],
        "llm_mask": mask,
    }


@pytest.fixture(scope="module")
def model() -> Step1XEdit:
    return randomize_(Step1XEdit(CONFIG), 0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def dit_onnx(model, tmp_path_factory) -> onnx.ModelProto:
    spec = dit_spec(CONFIG)
    path = tmp_path_factory.mktemp("onnx") / "dit.onnx"
    torch.onnx.export(model, tuple(_inputs().values()), str(path), dynamo=False, opset_version=19,
                      input_names=spec.input_names, output_names=spec.output_names, dynamic_axes=spec.dynamic_axes())
    return onnx.load(str(path))


def _artifact(model: nn.Module, recipe: str, **kw):
    collector = StatsCollector(model)
    with collector.active(), torch.no_grad():
        for seed in range(2):
            model(**_inputs(seed))
    return build_artifact(model, collector.stats, recipe, **kw)


def _ort(m: onnx.ModelProto, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The graph as ONNX defines it: no fusion, so no ISA-dependent int8 kernel (see the module's doc)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


@pytest.mark.isa
@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_graph_matches_torch(model, dit_onnx, recipe, per_channel, tmp_path):
    artifact = _artifact(model, recipe, per_channel=per_channel)
    out = tmp_path / "dit_q.onnx"
    qgraph = insert_qdq(dit_onnx, artifact, out)
    assert out.is_file() and onnx.load(str(out)).graph.node
    onnx.checker.check_model(qgraph)
    ops = Counter(n.op_type for n in qgraph.graph.node)
    n = len(artifact.layers)
    assert ops["QuantizeLinear"] == n and ops["DequantizeLinear"] == 2 * n
    assert ops["Mul"] - Counter(x.op_type for x in dit_onnx.graph.node)["Mul"] == (n if recipe == "int8-sq" else 0)
    stored = {i.name: i.data_type for i in qgraph.graph.initializer}
    want = onnx.TensorProto.INT8 if recipe == "int8-sq" else onnx.TensorProto.FLOAT8E4M3FN
    assert all(stored[f"{layer}.weight_quantized"] == want for layer in artifact.layers)
    def float_matrices(m):
        return [i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]

    assert len(float_matrices(qgraph)) == len(float_matrices(dit_onnx)) - n  # float weights replaced

    x = _inputs(5)
    qmodel = quantize_model(copy.deepcopy(model), artifact)
    with torch.no_grad():
        ref, torch_q = model(**x), qmodel(**x)
    onnx_q = _ort(qgraph, x)
    # Same Q/DQ maths, different float32 summation order (MLAS vs MKL/ATen): agreement far tighter than the
    # quantization error; what is left is the few 8-bit codes that flip where a value sits at a rounding tie.
    agree = sqnr_db(torch_q, onnx_q)
    quant = sqnr_db(ref, torch_q)
    print(f"\n{recipe} per_channel={per_channel}: torch vs ORT {agree:.1f} dB, "
          f"max |diff| {(torch_q - onnx_q).abs().max():.2e}; quantized vs fp32 {quant:.1f} dB")
    assert agree > quant + 30 and agree > 60
    assert sqnr_db(ref, onnx_q) == pytest.approx(quant, abs=0.05)


def test_qdq_refuses_mismatch(model, dit_onnx):
    artifact = _artifact(model, "fp8")
    broken = copy.deepcopy(artifact)
    broken.layers["not.a.layer"] = next(iter(artifact.layers.values()))
    with pytest.raises(ValueError, match="not.a.layer"):
        insert_qdq(dit_onnx, broken)
    old = copy.deepcopy(dit_onnx)
    old.opset_import[0].version = 17
    with pytest.raises(ValueError, match="opset >= 19"):
        insert_qdq(old, artifact)


class _Toy(nn.Module):
    """Linear layers the way the DiT uses them: on 3-D inputs (MatMul) and 2-D ones (Gemm)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean(1))


@pytest.mark.isa
def test_qdq_on_dynamo_export(tmp_path):
    """The dynamo exporter renames transposed weights (val_N): layers are found from node metadata."""
    toy = randomize_(_Toy(), 1).eval()
    x = torch.randn(2, 8, 32)
    path = tmp_path / "toy.onnx"
    torch.onnx.export(toy, (x,), str(path), dynamo=True, opset_version=19, input_names=["x"], output_names=["y"])
    collector = StatsCollector(toy)
    with collector.active(), torch.no_grad():
        toy(x)
    artifact = build_artifact(toy, collector.stats, "int8-sq", exclude=())
    qgraph = insert_qdq(str(path), artifact)
    with torch.no_grad():
        want = quantize_model(copy.deepcopy(toy), artifact)(x)
    got = _ort(qgraph, {"x": x})
    assert sqnr_db(want, got) > 60
    assert np.isfinite(got.numpy()).all()
