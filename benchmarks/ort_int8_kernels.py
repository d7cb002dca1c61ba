"""ONNX Runtime's CPU kernels for the W8A8 Q/DQ DiT graph, on this machine's vector ISA (tiny model, CPU).

The tests check the graph's meaning with ORT's graph optimizations off (each QuantizeLinear /
DequantizeLinear as ONNX defines it, float32 MatMuls): that holds on any CPU. With optimizations on, ORT
fuses Q/DQ + MatMul into int8 GEMMs whose kernel MLAS picks from CPUID (no setting narrows it): exact
int32 accumulation with AVX-512 VNNI / AVX-VNNI / AMX, int16 pair sums that can saturate on AVX2 without
VNNI (ORT's quantization docs suggest `reduce_range` there). This script reports, per recipe, how far the
optimized session is from the graph's semantics and from the float model, in dB (SQNR), with the CPU
flags, instead of a test asserting one machine's figure.

    python benchmarks/ort_int8_kernels.py
"""

from __future__ import annotations

import copy
import platform
import re
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

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

CONFIG = get_config("tiny")
LEVELS = {"graph semantics (ORT_DISABLE_ALL)": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "ORT's kernels (ORT_ENABLE_ALL)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_vnni|avx_vnni|amx_int8|fma)\b", text))
    model = next(iter(re.findall(r"model name\s*:\s*(.*)", text)), platform.processor())
    return f"{model}; {' '.join(sorted(flags)) or 'no AVX2'}"


def dit_inputs(seed: int) -> dict[str, torch.Tensor]:
    """A 64x64 edit's DiT inputs (4x4 tokens per half), batch 2 (CFG)."""
    g = torch.Generator().manual_seed(seed)
    n, txt = 16, CONFIG.embedder.max_length
    mask = torch.zeros(2, txt, dtype=torch.int64)
    mask[:, :40] = 1
    return {"img": torch.randn(2, 2 * n, 64, generator=g),
            "pe": rope_table(position_ids(txt, 4, 4, CONFIG.version), CONFIG.dit.axes_dim, CONFIG.dit.theta),
            "timestep": torch.tensor([0.7, 0.7]),
            "llm_embedding": torch.randn(2, txt, 64, generator=g) * mask[..., None], "llm_mask": mask}


def run_ort(graph: onnx.ModelProto, inputs: dict[str, torch.Tensor], level: ort.GraphOptimizationLevel) -> torch.Tensor:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def main() -> None:
    torch.manual_seed(0)
    model = randomize_(Step1XEdit(CONFIG), 0).eval().requires_grad_(False)
    spec = dit_spec(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dit.onnx"
        torch.onnx.export(model, tuple(dit_inputs(0).values()), str(path), dynamo=False, opset_version=19,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes())
        graph = onnx.load(str(path))
    collector = StatsCollector(model)
    with collector.active(), torch.no_grad():
        for seed in range(2):
            model(**dit_inputs(seed))
    print(f"CPU: {cpu_flags()}; onnxruntime {ort.__version__}, torch {torch.__version__} "
          f"(ATen {torch.backends.cpu.get_cpu_capability()})")
    print(f"{'recipe':8s} {'weights':11s} {'quantized vs fp32':>18s} " + " ".join(f"{k:>36s}" for k in LEVELS))
    x = dit_inputs(5)
    for recipe in ("fp8", "int8-sq"):
        for per_channel in (True, False):
            artifact = build_artifact(model, collector.stats, recipe, per_channel=per_channel)
            qgraph = insert_qdq(graph, artifact)
            with torch.no_grad():
                ref, want = model(**x), quantize_model(copy.deepcopy(model), artifact)(**x)
            cells = [f"{sqnr_db(want, run_ort(qgraph, x, level)):6.1f} dB vs torch W8A8" for level in LEVELS.values()]
            print(f"{recipe:8s} {'per-channel' if per_channel else 'per-tensor':11s} {sqnr_db(ref, want):15.1f} dB "
                  + " ".join(f"{c:>36s}" for c in cells))


if __name__ == "__main__":
    main()
