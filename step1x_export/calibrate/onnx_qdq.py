"""Apply a `QuantArtifact` to an ONNX graph as explicit QuantizeLinear / DequantizeLinear pairs.

The form is the one TensorRT's strongly-typed builder consumes ("explicit quantization") and ONNX
Runtime runs on CPU:

    x --[Mul 1/s]--> QuantizeLinear(x_scale) -> DequantizeLinear(x_scale) --\
                                                                            MatMul / Gemm -> (bias Add)
    W_q (int8 / float8e4m3fn initializer) -> DequantizeLinear(w_scale, axis) --/

Activation scales are per tensor (scalars); weight scales per output channel (`axis` is the N axis
of the initializer as the node consumes it) or per tensor. Weights are stored quantized; the float
initializer is removed when nothing else reads it. The SmoothQuant factor enters as a Mul by 1/s
before the activation's Q/DQ, and W * s is what gets quantized.

Linear layers are found from each MatMul / Gemm whose second input is a weight initializer (directly,
or through a Transpose), named by, in order: the dynamo exporter's `pkg.torch.onnx.name_scopes` node
metadata; the initializer's own name (`<layer>.weight`); the TorchScript exporter's node name scope
(`/double_blocks.0/img_mlp/img_mlp.0/MatMul`); each checked against the artifact's weight probe (16
weight values). Where names say nothing (the TorchScript exporter names a Linear called from a method
other than its parent's forward `/double_blocks.0/qkv_1/MatMul`, and onnxslim may drop metadata),
the probe alone finds the layer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..onnx_files import save_graph
from .artifact import LayerScales, QuantArtifact, weight_probe
from .formats import QuantFormat
from .qlinear import quantize_weight

MIN_OPSET = {QuantFormat.INT8: 13, QuantFormat.FP8_E4M3: 19}  # per-axis Q/DQ: 13; float8 Q/DQ: 19
_STORAGE = {QuantFormat.INT8: TensorProto.INT8, QuantFormat.FP8_E4M3: TensorProto.FLOAT8E4M3FN}
_FLOATS = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf cannot hold a 2 GiB model: weights go to `<name>.data` beside it


@dataclass
class _WeightSite:
    node: onnx.NodeProto  # the MatMul / Gemm
    init: onnx.TensorProto  # the float weight initializer
    consumer: onnx.NodeProto  # the node whose input reads `init` (the GEMM itself or a Transpose)
    input_index: int
    nk_layout: bool  # True: init is [N, K] (Gemm transB=1, Transpose); False: [K, N] (MatMul)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _weight_site(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                 producers: dict[str, onnx.NodeProto]) -> _WeightSite | None:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return None
    b = node.input[1]
    if b in inits and len(inits[b].dims) == 2:
        nk = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
        return _WeightSite(node, inits[b], node, 1, nk)
    prod = producers.get(b)
    if prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits:
        perm = list(_attr(prod, "perm", [1, 0]) or [1, 0])
        if perm == [1, 0] and len(inits[prod.input[0]].dims) == 2 and node.op_type == "MatMul":
            return _WeightSite(node, inits[prod.input[0]], prod, 0, True)
    return None


def _legacy_scope(node_name: str) -> str | None:
    """'/a/b.0/mlp/mlp.0/Gemm' -> 'a.b.0.mlp.0' (a child of a Sequential repeats its parent's name)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return None
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    return ".".join(path)


def _nk_weight(site: _WeightSite) -> torch.Tensor:
    w = torch.from_numpy(numpy_helper.to_array(site.init).astype(np.float32))
    return w if site.nk_layout else w.t()


def _probe_matches(w_nk: torch.Tensor, s: LayerScales) -> bool:
    """The weight holds the layer's probe values (to bf16 / fp16 rounding: the graph may be cast)."""
    if tuple(w_nk.shape) != (s.out_features, s.in_features) or s.weight_probe is None:
        return False
    got = weight_probe(w_nk)
    return bool(torch.allclose(got, s.weight_probe, rtol=1e-2, atol=1e-6))


def _layer_name(site: _WeightSite, known: dict[str, LayerScales]) -> str | None:
    """The artifact layer this GEMM computes: by exporter names (checked by probe), else by probe alone."""
    w_nk = _nk_weight(site)
    candidates: list[str] = []
    meta = {p.key: p.value for p in site.node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        if len(scopes) >= 2:
            candidates.append(scopes[-2])
    if site.init.name.endswith(".weight"):
        candidates.append(site.init.name.removesuffix(".weight"))
    if site.node.name.startswith("/"):
        candidates.append(_legacy_scope(site.node.name) or "")
    for c in candidates:
        if c in known and (known[c].weight_probe is None or _probe_matches(w_nk, known[c])):
            return c
    by_value = [n for n, s in known.items() if _probe_matches(w_nk, s)]
    if len(by_value) > 1:
        raise ValueError(f"ONNX weight {site.init.name} matches several layers' values: {by_value[:4]}")
    return by_value[0] if by_value else None


def _tensor(name: str, t: torch.Tensor, onnx_type: int) -> onnx.TensorProto:
    """An initializer of `onnx_type` from a torch tensor already in the matching dtype (raw bytes)."""
    t = t.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # 0-d tensors cannot be viewed as bytes
    return helper.make_tensor(name, onnx_type, list(t.shape), raw, raw=True)


def _float_tensor(name: str, t: torch.Tensor, onnx_type: int) -> onnx.TensorProto:
    return _tensor(name, t.float().to(_FLOATS[onnx_type]), onnx_type)


def _check_opset(model: onnx.ModelProto, fmt: QuantFormat, float_type: int) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    need = max(MIN_OPSET[fmt], 19 if float_type == TensorProto.BFLOAT16 else 0)
    if opset < need:
        raise ValueError(f"ONNX graph has opset {opset}; {fmt.value} Q/DQ on "
                         f"{TensorProto.DataType.Name(float_type)} needs opset >= {need}: re-export with it")


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, artifact: QuantArtifact):
        self.model, self.artifact, self.fmt = model, artifact, artifact.fmt
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producers = {o: n for n in g.node for o in n.output}
        self.weight_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.before: dict[int, list[onnx.NodeProto]] = {}  # id(GEMM node) -> nodes to insert before it
        self.done_weights: dict[str, str] = {}  # layer -> dequantized weight tensor name
        self.matched: dict[str, int] = {}

    def zero_point(self, name: str, shape: list[int]) -> onnx.TensorProto:
        dtype = self.fmt.storage_dtype
        return _tensor(name, torch.zeros(shape, dtype=torch.int8).view(dtype), _STORAGE[self.fmt])

    def weight(self, layer: str, site: _WeightSite, s: LayerScales) -> str:
        """Quantize the weight once per layer; returns the DequantizeLinear output's name."""
        if layer in self.done_weights:
            return self.done_weights[layer]
        ftype = site.init.data_type
        w_nk = _nk_weight(site)
        if tuple(w_nk.shape) != (s.out_features, s.in_features):
            raise ValueError(f"ONNX weight {site.init.name} of {layer} is {list(site.init.dims)} "
                             f"({'NK' if site.nk_layout else 'KN'} layout); the artifact says in {s.in_features}, "
                             f"out {s.out_features}")
        if s.smooth is not None:
            w_nk = w_nk * s.smooth.float()[None, :]
        q = quantize_weight(w_nk, s.weight_scale, self.fmt)
        per_channel = s.weight_scale.numel() > 1
        q = q if site.nk_layout else q.t()
        names = [f"{layer}.weight_quantized", f"{layer}.weight_scale", f"{layer}.weight_zero_point"]
        scale_shape = [s.out_features] if per_channel else []
        self.new_inits += [
            _tensor(names[0], q, _STORAGE[self.fmt]),
            _float_tensor(names[1], s.weight_scale.reshape(scale_shape), ftype),
            self.zero_point(names[2], scale_shape),
        ]
        out = f"{layer}.weight_dequantized"
        kw = {"axis": 0 if site.nk_layout else 1} if per_channel else {}
        self.weight_nodes.append(helper.make_node("DequantizeLinear", names, [out], name=f"{layer}/weight_dq", **kw))
        self.done_weights[layer] = out
        return out

    def activation(self, layer: str, site: _WeightSite, s: LayerScales) -> None:
        ftype = site.init.data_type
        k = self.matched[layer]
        prefix = f"{layer}.input{'' if k == 0 else f'_{k}'}"
        x = site.node.input[0]
        nodes = []
        if s.smooth is not None:
            self.new_inits.append(_float_tensor(f"{prefix}.smooth_inv", 1.0 / s.smooth.float(), ftype))
            nodes.append(helper.make_node("Mul", [x, f"{prefix}.smooth_inv"], [f"{prefix}.smoothed"],
                                          name=f"{prefix}/smooth"))
            x = f"{prefix}.smoothed"
        # Scales in the graph's float type: QuantizeLinear up to opset 21 types y_scale as x (T1), so a bf16 graph
        # cannot carry float32 scales without a Cast around every Q/DQ pair (opset 23 decouples the two).
        self.new_inits += [_float_tensor(f"{prefix}.scale", s.input_scale.reshape(()), ftype),
                           self.zero_point(f"{prefix}.zero_point", [])]
        qdq_in = [f"{prefix}.scale", f"{prefix}.zero_point"]
        nodes += [
            helper.make_node("QuantizeLinear", [x, *qdq_in], [f"{prefix}.quantized"], name=f"{prefix}/q"),
            helper.make_node("DequantizeLinear", [f"{prefix}.quantized", *qdq_in], [f"{prefix}.dequantized"],
                             name=f"{prefix}/dq"),
        ]
        site.node.input[0] = f"{prefix}.dequantized"
        self.before[id(site.node)] = nodes

    def run(self) -> None:
        g = self.model.graph
        sites = [s for n in g.node if (s := _weight_site(n, self.inits, self.producers)) is not None]
        if sites:
            _check_opset(self.model, self.fmt, sites[0].init.data_type)
        for site in sites:
            layer = _layer_name(site, self.artifact.layers)
            if layer is None:
                continue
            s = self.artifact.layers[layer]
            if site.init.data_type not in _FLOATS:
                raise ValueError(f"ONNX weight {site.init.name} of {layer} is "
                                 f"{TensorProto.DataType.Name(site.init.data_type)}, expected a float type")
            self.matched.setdefault(layer, 0)
            site.consumer.input[site.input_index] = self.weight(layer, site, s)
            self.activation(layer, site, s)
            self.matched[layer] += 1
        nodes = list(self.weight_nodes)
        for n in g.node:
            nodes += self.before.get(id(n), [])
            nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input}
        kept = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(kept + self.new_inits)


def insert_qdq(onnx_model_or_path: onnx.ModelProto | str | Path, artifact: QuantArtifact,
               out_path: str | Path | None = None, *, strict: bool = True) -> onnx.ModelProto:
    """Return (and write to `out_path`, if given) the graph with the artifact's layers as Q/DQ.

    `strict`: every layer of the artifact must be found in the graph (else ValueError naming them).
    """
    out_path = None if out_path is None else Path(out_path)
    if out_path is not None and not out_path.parent.is_dir():  # before the work, not after it
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist")
    if isinstance(onnx_model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(onnx_model_or_path)
    else:
        path = Path(onnx_model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX graph {path} does not exist")
        model = onnx.load(str(path))
    rw = _Rewriter(model, artifact)
    rw.run()
    missing = sorted(set(artifact.layers) - set(rw.matched))
    if strict and missing:
        raise ValueError(f"{len(missing)} layers of the {artifact.recipe} artifact have no MatMul/Gemm in the ONNX "
                         f"graph: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   "step1x_export.quant.recipe": artifact.recipe,
                                   "step1x_export.quant.model_hash": artifact.model_hash})
    if out_path is not None:
        save_graph(model, out_path, external_data_threshold=_EXTERNAL_DATA_BYTES)
    return model
