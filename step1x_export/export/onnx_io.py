"""One module -> one ONNX graph: torch.onnx's dynamo exporter, clean-up, stable names, external data.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). It emits opset 18+ graphs, folds
constants and removes dead nodes itself (onnxscript's optimizer); we then run ONNX shape inference and
restore parameter names (below). Opset 20 by default: TensorRT 10 parses 9-20 and ORT 1.20+ runs it,
and FP8/INT8 Q/DQ (per-axis, fp8 types) needs >= 19.

Initializer names = torch parameter names. The exporter lowers a Linear on 3-D activations to
MatMul(x, W^T) and constant-folds W^T into a new anonymous initializer; `restore_weight_names` puts the
original `{module}.weight` [out, in] back with an explicit Transpose node (TensorRT and ORT fold it at
build time), so quantization tools find every weight by its torch module name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..onnx_files import graph_bytes, save_graph
from ..specs import ComponentSpec

DEFAULT_OPSET = 20
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's hard limit: a graph at or above it cannot be one file
EXPORTER = "torch.onnx.export(dynamo=True)"


# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
INFER_IN_MEMORY_LIMIT = 2**31 - 2**26


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    spec: ComponentSpec,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Export `module(*args)` to `path` per `spec`; returns the files written (graph, then external data)."""
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            dynamo=True,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    restore_weight_names(model, module)
    _name_dims(model, spec)
    # In-memory shape inference serialises the whole model, which protobuf refuses past 2 GB:
    # large graphs are inferred from the saved file instead (weights stay in the external data).
    in_memory = graph_bytes(model) < INFER_IN_MEMORY_LIMIT
    if in_memory:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    files = save_graph(model, path, external_data_threshold=min(external_data_threshold, INFER_IN_MEMORY_LIMIT))
    if not in_memory:
        onnx.shape_inference.infer_shapes_path(str(files[0]), str(files[0]), data_prop=True)
    return files


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs each phase at INFO and prints progress; the caller shows its own bar."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logger.setLevel(level)


ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
              torch.bfloat16: onnx.TensorProto.BFLOAT16}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw bits as unsigned ints of its width (numpy has no bfloat16)."""
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def _digest(array: np.ndarray) -> str:
    bits = np.ascontiguousarray(array).view(_UINT[array.itemsize])
    return f"{hashlib.sha1(bits.tobytes()).hexdigest()}{array.shape}{array.itemsize}"


def _tensor_proto(t: torch.Tensor, name: str) -> onnx.TensorProto:
    return onnx.helper.make_tensor(name, ONNX_TYPES[t.dtype], list(t.shape), _bits(t).tobytes(), raw=True)


def restore_weight_names(model: onnx.ModelProto, module: nn.Module) -> int:
    """Rename initializers that are a (transposed) copy of a 2-D parameter back to the parameter's name.

    An exact copy is renamed; a transposed copy becomes the parameter in torch layout plus a Transpose
    node. Matching is by value (bytes, shape, dtype), so it does not depend on the exporter's node names.
    Returns how many initializers were renamed.
    """
    graph = model.graph
    params = {name: p.detach().cpu() for name, p in module.named_parameters()}
    present = {init.name for init in graph.initializer}
    by_value: dict[str, tuple[str, bool]] = {}
    for name, p in params.items():
        if name in present or p.dim() != 2 or p.dtype not in ONNX_TYPES:
            continue
        by_value.setdefault(_digest(_bits(p)), (name, False))
        by_value.setdefault(_digest(_bits(p.T)), (name, True))
    renamed = 0
    new_nodes: list[onnx.NodeProto] = []
    for init in graph.initializer:
        if init.name in params or len(init.dims) != 2:
            continue
        hit = by_value.get(_digest(numpy_helper.to_array(init)))
        if hit is None or hit[0] in present:
            continue
        name, transposed = hit
        old = init.name
        if transposed:
            init.CopyFrom(_tensor_proto(params[name], name))
            new_nodes.append(onnx.helper.make_node("Transpose", [name], [old], perm=[1, 0], name=f"{name}/transpose"))
        else:
            init.name = name
            _rename_uses(graph, old, name)
        present.add(name)
        renamed += 1
    # Topological order: the transposes read initializers only, so they go first.
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    return renamed


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _name_dims(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give graph inputs/outputs the spec's dim names (the exporter may merge or rename equal dims)."""
    for value in (*model.graph.input, *model.graph.output):
        try:
            tensor = spec.tensor(value.name)
        except KeyError:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, tensor.dims, strict=False):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want
