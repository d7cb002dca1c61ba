"""Quantized checkpoints: the deployable product of calibration.

One safetensors file holds the whole DiT (connector included) as the runtime runs it: the W8A8 layers'
8-bit weights with their scales and smoothing factors (`QuantLinear`'s buffers), the weight-only layers'
8-bit weights and scales (`WeightOnlyLinear`), the 4-bit layers' codes, scales and zeros (`Int4Linear`, group-wise
in torch's W4A16 format), every other tensor as it is, all keyed by module name.
The header's `step1x_export.qcheckpoint` metadata holds the recipe, the layer selection, the source
checkpoint's identity, the artifact's calibration set and the model config.

`write_quantized_checkpoint` streams the source one layer at a time (`safetensors_io`): host memory
stays near one layer, whether the source is bf16 or the FP8-stored v1.0 file (each layer is cast to
the calibration dtype on its own, exactly as `load_into` would cast the whole model). Each layer goes
through the same `QuantLinear.from_linear` as `quantize_model`, so the checkpoint's weights are the
artifact path's weights bit for bit. `load_quantized_checkpoint` builds the model on `meta`, swaps in
the 8-bit modules and assigns the file's tensors read straight onto the device: no float copy of a
quantized layer exists there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..choices import MODULATION, WEIGHT_ONLY_DEFAULT  # noqa: F401  (the layer names its defaults use)
from ..folders import SHA256, check_schema, parse_json
from ..hashing import FileIdentity, file_identity
from ..safetensors_io import SafetensorsIOError, TensorInfo, TensorReader, group_by_module, stream_safetensors
from ..step1x_ref.configs import CONFIGS, ModelConfig, get_config
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.weights.loading import CheckpointError, check_state_dict
from .artifact import QuantArtifact, _metadata, dtype_name
from .formats import QuantFormat
from .int4 import INT4_GROUP, Int4Linear, group_size_for
from .qlinear import QuantLinear
from .recipes import select_layers
from .weight_only import WeightOnlyLinear, set_submodule

METADATA_KEY = "step1x_export.qcheckpoint"
FORMAT_VERSION = 1
DTYPES = {dtype_name(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}

_FORMAT_OR_NONE = {"anyOf": [{"type": "null"}, {"enum": [f.value for f in QuantFormat]}]}
_NAME = {"type": "string", "maxLength": 500}
# The header metadata is read from a file someone handed us: checked before any field is used, so a
# damaged or foreign header is refused with the field named, not a KeyError deep in the loader.
QCHECKPOINT_SCHEMA = {
    "type": "object",
    "required": ["format_version", "config", "dtype", "layout", "source", "quant"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "config": {"enum": list(CONFIGS)},
        "dtype": {"enum": list(DTYPES)},
        "layout": {
            "type": "object", "required": ["w8a8", "w8a8_format", "weight_only", "weight_only_format"],
            "additionalProperties": False,
            "properties": {
                "w8a8": {"type": "object", "maxProperties": 100_000, "propertyNames": _NAME,
                         "additionalProperties": {
                             "type": "object", "additionalProperties": False,
                             "required": ["in_features", "out_features", "per_channel", "smooth"],
                             "properties": {"in_features": {"type": "integer", "minimum": 1},
                                            "out_features": {"type": "integer", "minimum": 1},
                                            "per_channel": {"type": "boolean"}, "smooth": {"type": "boolean"}}}},
                "w8a8_format": _FORMAT_OR_NONE,
                "weight_only": {"type": "array", "maxItems": 100_000, "items": _NAME},
                "weight_only_format": _FORMAT_OR_NONE,
                "int4": {"type": "array", "maxItems": 100_000, "items": _NAME},
                "int4_group": {"enum": [INT4_GROUP, 64, 32]},
            },
        },
        "source": {"type": "object", "properties": {"file": _NAME, "size": {"type": "integer", "minimum": 0},
                                                    "sha256": SHA256}},
        "quant": {"type": "object"},
    },
}


@dataclass(frozen=True)
class QuantizedLayout:
    """Which Linear becomes what: W8A8 layers (from an artifact), 8-bit weight-only layers, 4-bit layers."""

    w8a8: dict[str, dict]  # name -> {"in_features", "out_features", "per_channel", "smooth"}
    w8a8_format: QuantFormat | None
    weight_only: tuple[str, ...]
    weight_only_format: QuantFormat | None
    int4: tuple[str, ...] = ()
    int4_group: int = INT4_GROUP  # preferred; a layer whose width it does not divide takes `group_size_for`'s

    def as_dict(self) -> dict:
        return {"w8a8": self.w8a8, "w8a8_format": self.w8a8_format and self.w8a8_format.value,
                "weight_only": list(self.weight_only),
                "weight_only_format": self.weight_only_format and self.weight_only_format.value,
                "int4": list(self.int4), "int4_group": self.int4_group}

    @classmethod
    def from_dict(cls, d: dict) -> QuantizedLayout:
        fmt, wo = d.get("w8a8_format"), d.get("weight_only_format")
        return cls(d["w8a8"], fmt and QuantFormat(fmt), tuple(d["weight_only"]), wo and QuantFormat(wo),
                   tuple(d.get("int4", ())), d.get("int4_group", INT4_GROUP))


def layout_for(model: nn.Module, artifact: QuantArtifact | None, weight_only: tuple[str, ...],
               weight_only_format: QuantFormat | None, int4: tuple[str, ...] = (),
               int4_group: int = INT4_GROUP) -> QuantizedLayout:
    """The layout for `model`: the artifact's layers W8A8; Linears matching `weight_only` (and not W8A8) 8-bit
    weight-only; Linears matching `int4` and neither of those 4-bit (the 8-bit choices name the sensitive layers)."""
    w8a8 = {} if artifact is None else {
        n: {"in_features": s.in_features, "out_features": s.out_features,
            "per_channel": s.weight_scale.numel() > 1, "smooth": s.smooth is not None}
        for n, s in artifact.layers.items()}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wo = tuple(n for n in select_layers(linears, weight_only, ()) if n not in w8a8) if weight_only else ()
    if wo and weight_only_format is None:
        raise ValueError("weight-only layers were selected without a weight-only format (fp8_e4m3 or int8)")
    four = tuple(n for n in select_layers(linears, int4, ()) if n not in w8a8 and n not in wo) if int4 else ()
    return QuantizedLayout(w8a8, artifact.fmt if artifact else None, wo, weight_only_format if wo else None,
                           four, int4_group)


def swap_on_meta(model: nn.Module, layout: QuantizedLayout, dtype: torch.dtype) -> nn.Module:
    """Replace the layout's Linears by empty 8-bit modules on `meta` (the shapes a checkpoint must have)."""
    for name, d in layout.w8a8.items():
        linear = _linear(model, name)
        set_submodule(model, name, QuantLinear(
            linear.in_features, linear.out_features, layout.w8a8_format, bias=linear.bias is not None,
            per_channel=d["per_channel"], smooth=d["smooth"], dtype=dtype, device="meta"))
    for name in layout.weight_only:
        linear = _linear(model, name)
        set_submodule(model, name, WeightOnlyLinear(linear.in_features, linear.out_features,
                                                    layout.weight_only_format, bias=linear.bias is not None,
                                                    dtype=dtype, device="meta"))
    for name in layout.int4:
        linear = _linear(model, name)
        set_submodule(model, name, Int4Linear(linear.in_features, linear.out_features,
                                              group_size_for(linear.in_features, layout.int4_group),
                                              bias=linear.bias is not None, dtype=dtype, device="meta"))
    return model


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        m = None
    if not isinstance(m, nn.Linear):
        got = type(m).__name__ if m else "nothing"
        raise ValueError(f"layer {name}: the model has {got} there, expected nn.Linear")
    return m


@dataclass(frozen=True)
class QCheckpointInfo:
    path: Path
    config: str
    dtype: torch.dtype  # of every tensor that is not 8-bit or a scale
    layout: QuantizedLayout
    source: dict  # identity of the checkpoint it was quantized from
    quant: dict  # the artifact's metadata (recipe, selection, calibration set), {} if weight-only only

    def summary(self) -> str:
        fmt = self.layout.w8a8_format.value if self.layout.w8a8_format else "-"
        wo = self.layout.weight_only_format.value if self.layout.weight_only_format else "-"
        return (f"{len(self.layout.w8a8)} W8A8 layers ({fmt}), {len(self.layout.weight_only)} weight-only layers "
                f"({wo}), {len(self.layout.int4)} 4-bit layers (groups of up to {self.layout.int4_group}), "
                f"other tensors {dtype_name(self.dtype)}; config {self.config}; "
                f"from {self.source.get('file', '?')} {self.source.get('sha256', '')[:12]}")


def write_quantized_checkpoint(
    source: str | Path, config: str | ModelConfig, out: str | Path, *, artifact: QuantArtifact | None = None,
    weight_only: tuple[str, ...] = (), weight_only_format: QuantFormat | None = None,
    int4: tuple[str, ...] = (), int4_group: int = INT4_GROUP, int4_clip: bool = True,
    int4_hessians: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None, progress: bool = False,
) -> QCheckpointInfo:
    """Stream the DiT checkpoint `source` into a quantized checkpoint at `out` (written atomically).

    `config`: a registered config name (what the runtime will look up when loading), or a ModelConfig.
    `int4`: name patterns of the Linears stored in 4 bits (`int4_clip`: with the range search; `int4_hessians`:
    each such layer's H from `hessians.collect_hessians`, its codes then by GPTQ).
    """
    config = get_config(config) if isinstance(config, str) else config
    if dtype is None:  # the dtype the artifact's scales were calibrated in
        dtype = DTYPES.get(artifact.model_dtype, torch.bfloat16) if artifact else torch.bfloat16
    reader = TensorReader(source)
    identity = file_identity(source)
    if artifact is not None:
        _check_artifact_source(artifact, identity, dtype)
    with torch.device("meta"):
        model = Step1XEdit(config).to(dtype)  # the dtypes the output declares
    check_state_dict(model, {k: torch.empty(i.shape, device="meta") for k, i in reader.infos.items()}, str(source))
    layout = layout_for(model, artifact, weight_only, weight_only_format, int4, int4_group)
    swap_on_meta(model, layout, dtype)
    entries = {k: TensorInfo(t.dtype, tuple(t.shape)) for k, t in model.state_dict().items()}
    info = QCheckpointInfo(Path(out), config.name, dtype, layout, identity.as_dict(),
                           _metadata(artifact) if artifact else {})
    groups = group_by_module(entries)
    with stream_safetensors(out, entries, {METADATA_KEY: json.dumps(_info_dict(info), ensure_ascii=False)}) as w:
        for name, keys in tqdm(groups.items(), desc="quantizing", unit="layer", disable=not progress, leave=False):
            for k, t in _quantized_group(model.get_submodule(name), name, keys, reader, artifact, dtype,
                                         int4_clip, int4_hessians).items():
                w.write(k, t)
    return info


def _quantized_group(module: nn.Module, name: str, keys: list[str], reader: TensorReader,
                     artifact: QuantArtifact | None, dtype: torch.dtype, int4_clip: bool = True,
                     int4_hessians: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The output tensors of one module, read (and, for 8-bit modules, quantized) from the source."""
    prefix = f"{name}." if name else ""
    if isinstance(module, QuantLinear | WeightOnlyLinear | Int4Linear):
        src = {k.removeprefix(prefix): v.to(dtype) for k, v in reader.read(
            f"{prefix}{p}" for p in ("weight", "bias") if module.bias is not None or p == "weight").items()}
        linear = nn.Linear(module.in_features, module.out_features, bias="bias" in src, device="meta", dtype=dtype)
        linear.load_state_dict(src, assign=True)
        if isinstance(module, QuantLinear):
            s = artifact.layers[name]
            q = QuantLinear.from_linear(linear, module.fmt, input_scale=s.input_scale, weight_scale=s.weight_scale,
                                        smooth=s.smooth)
        elif isinstance(module, Int4Linear):
            hessian = int4_hessians[name] if int4_hessians is not None else None
            q = Int4Linear.from_linear(linear, module.group_size, clip_search=int4_clip, hessian=hessian)
        else:
            q = WeightOnlyLinear.from_linear(linear, module.fmt)
        state = q.state_dict()
        return {k: state[k.removeprefix(prefix)] for k in keys}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in reader.read(keys).items()}


def _check_artifact_source(artifact: QuantArtifact, identity: FileIdentity, dtype: torch.dtype) -> None:
    if artifact.source and artifact.source.get("sha256") != identity.sha256:
        raise ValueError(f"the quantization artifact was calibrated on {artifact.source.get('file')} "
                         f"(sha256 {artifact.source.get('sha256', '')[:12]}), not on {identity.name} "
                         f"(sha256 {identity.sha256[:12]}): recalibrate on this checkpoint")
    if artifact.model_dtype != dtype_name(dtype):
        raise ValueError(f"the quantization artifact was calibrated in {artifact.model_dtype}; quantizing in "
                         f"{dtype_name(dtype)} would not match its scales")


def _info_dict(info: QCheckpointInfo) -> dict:
    return {"format_version": FORMAT_VERSION, "config": info.config, "dtype": dtype_name(info.dtype),
            "layout": info.layout.as_dict(), "source": info.source, "quant": info.quant}


def read_qcheckpoint_info(path: str | Path) -> QCheckpointInfo | None:
    """The checkpoint's metadata, or None when `path` is not a quantized checkpoint (e.g. an artifact)."""
    raw = TensorReader(path).metadata.get(METADATA_KEY)
    if raw is None:
        return None
    d = parse_json(raw, f"{path} metadata", error=CheckpointError)
    version = d.get("format_version") if isinstance(d, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: quantized checkpoint version {version}, "
                              f"this step1x-export reads {FORMAT_VERSION}")
    check_schema(d, QCHECKPOINT_SCHEMA, f"{path} metadata ('{METADATA_KEY}')", error=CheckpointError)
    return QCheckpointInfo(Path(path), d["config"], DTYPES[d["dtype"]], QuantizedLayout.from_dict(d["layout"]),
                           d["source"], d["quant"])


def load_quantized_checkpoint(path: str | Path, device: str | torch.device,
                              dtype: torch.dtype | None = None) -> tuple[nn.Module, QCheckpointInfo]:
    """The quantized DiT, built on `meta` and assigned the file's tensors read onto `device`."""
    info = read_qcheckpoint_info(path)
    if info is None:
        raise CheckpointError(f"{path} is not a quantized checkpoint (no '{METADATA_KEY}' metadata)")
    if dtype is not None and dtype != info.dtype:
        raise CheckpointError(f"{path} holds its high-precision layers in {dtype_name(info.dtype)}; the runtime asked "
                              f"for {dtype_name(dtype)}: load it with dtype {dtype_name(info.dtype)}")
    with torch.device("meta"):
        model = Step1XEdit(get_config(info.config)).to(info.dtype)
    swap_on_meta(model, info.layout, info.dtype)
    try:
        state = TensorReader(path, device=device).read_all()
    except SafetensorsIOError as e:
        raise CheckpointError(str(e)) from e
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.choose_kernel()  # assign=True replaced the buffers: pick the GEMM for their device now
    return model.eval().requires_grad_(False), info
