"""Writing an ONNX graph to disk, whole or not at all: the exporter and the Q/DQ rewriter both write graphs
this way, so it sits below both."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx


def graph_bytes(model: onnx.ModelProto) -> int:
    return sum(init.ByteSize() for init in model.graph.initializer) + sum(
        n.ByteSize() for n in model.graph.node if n.op_type == "Constant"
    )


def save_graph(model: onnx.ModelProto, path: Path, *, external_data_threshold: int) -> list[Path]:
    """Write `path` (and `path.data` when the weights reach the threshold), each via a temp name + rename;
    an error or Ctrl-C part way leaves no temporary file behind."""
    external = graph_bytes(model) >= external_data_threshold
    tmp = path.with_name(f".{path.name}.tmp")
    data_name = f"{path.name}.data"
    tmp_data = path.with_name(f".{data_name}.tmp")
    tmp_dir = path.with_name(f".{path.name}.parts")
    try:
        if not external:
            onnx.save_model(model, tmp)
            os.replace(tmp, path)
            return [path]
        # onnx writes the data file under the name recorded in the graph: record the final name, write
        # the temp graph into a sibling temp folder, then move both.
        tmp_dir.mkdir(exist_ok=True)
        onnx.save_model(
            model, tmp_dir / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=1024,
        )
        os.replace(tmp_dir / data_name, tmp_data)
        os.replace(tmp_dir / path.name, tmp)
        os.replace(tmp_data, path.with_name(data_name))
        os.replace(tmp, path)
        return [path, path.with_name(data_name)]
    finally:
        for leftover in (tmp, tmp_data):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
