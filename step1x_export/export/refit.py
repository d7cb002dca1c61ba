"""The weight-name map a TensorRT refit needs to take new DiT weights (e.g. a LoRA merged) into a built engine.

TensorRT names an engine's refittable weights after the ONNX initializers they came from, and our exports
keep each torch parameter's name as its initializer's name (see `onnx_io`). A refit of a bf16 / fp16 / fp32
engine therefore sets, for every weight a LoRA changed, the initializer of the same name; this module
checks that each one is there with the torch tensor's shape, so a refit never guesses. A quantized export
has no float initializer for its quantized layers (their weights are stored as FP8 / INT8 with scales
calibrated on the old weights): such engines are rebuilt from a re-calibrated export instead.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from .manifest import ExportError


def refit_names(onnx_path: str | Path, weights: dict[str, torch.Size]) -> dict[str, str]:
    """torch weight name -> the ONNX initializer (= TensorRT refit weight) name holding it, for `weights`
    (name -> shape, e.g. the names `merge_lora` returns). Raises ExportError naming every weight that has
    no float initializer of that shape in the graph."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    floats = {i.name for i in model.graph.initializer if i.data_type in float_types}
    missing = sorted(n for n in weights if n not in floats)
    wrong = sorted(f"{n}: graph {list(inits[n])}, model {list(s)}" for n, s in weights.items()
                   if n in floats and inits[n] != tuple(s))
    problems = []
    if missing:
        problems.append(f"not float initializers (quantized or folded): {', '.join(missing[:10])}")
    if wrong:
        problems.append(f"shapes differ: {', '.join(wrong[:10])}")
    if problems:
        raise ExportError(f"{onnx_path}: cannot refit {len(missing) + len(wrong)} weights by name "
                          f"({'; '.join(problems)}); rebuild the engine from a new export instead")
    return {name: name for name in weights}
