"""The quantization artifact: one versioned safetensors file of scales plus JSON metadata.

Layout: tensors `<layer>.input_scale` [] , `<layer>.weight_scale` [N] or [1], and for SmoothQuant
`<layer>.smooth` [K], and `<layer>.weight_probe` [16] (to find the weight in ONNX graphs), all float32;
the safetensors header's metadata key `step1x_export.quant` holds a JSON object with the recipe, format,
alpha, layer selection, model hash and calibration set.

The model hash is `hashing.module_hash` of the model exactly as it was calibrated (its state dict in
its own dtype: fp32 for the tiny model, bf16 for a checkpoint loaded with the default dtype). Apply
the artifact to a model loaded the same way; weights quantized from different values would not
match the calibrated scales.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..files import atomic_path
from ..folders import SHA256, UntrustedFileError, check_schema, parse_json
from .formats import QuantFormat

FORMAT_VERSION = 1
METADATA_KEY = "step1x_export.quant"


class ArtifactError(UntrustedFileError):
    """A quantization artifact is missing, malformed, or of another format version."""


@dataclass
class LayerScales:
    in_features: int
    out_features: int
    input_scale: Tensor  # [] float32: static per-tensor activation scale (after smoothing)
    weight_scale: Tensor  # [N] per output channel, or [1] per tensor; float32
    smooth: Tensor | None = None  # [K] SmoothQuant factors s: x / s, W * s
    # A few weight values at fixed positions (`weight_probe`): finds the layer's weight in an ONNX graph
    # whatever name the exporter gave it.
    weight_probe: Tensor | None = None


PROBE_SIZE = 16


def weight_probe(weight: Tensor) -> Tensor:
    """PROBE_SIZE values of a [N, K] weight at evenly spaced flat positions, float32."""
    flat = weight.detach().reshape(-1)
    return flat[torch.linspace(0, flat.numel() - 1, PROBE_SIZE).long()].float().cpu()


@dataclass
class QuantArtifact:
    recipe: str  # "fp8" | "int8-sq"
    fmt: QuantFormat
    model_hash: str
    model_dtype: str  # dtype of the model that was hashed and calibrated
    layers: dict[str, LayerScales]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    alpha: float | None = None  # SmoothQuant migration strength
    weight_granularity: str = "per_channel"
    calibration: dict = field(default_factory=dict)  # dataset description, steps, size_level, seed, cfg
    format_version: int = FORMAT_VERSION
    # The checkpoint file the model was loaded from ({"file", "size", "sha256"}, `hashing.file_identity`);
    # empty for models built in code. Lets a load check identity from the file, not by hashing tensors.
    source: dict = field(default_factory=dict)

    def summary(self) -> str:
        alpha = f", alpha {self.alpha}" if self.alpha is not None else ""
        return (f"{self.recipe} ({self.fmt.value}{alpha}, weights {self.weight_granularity}): "
                f"{len(self.layers)} quantized Linear layers; model {self.model_hash[:12]}")


def _metadata(a: QuantArtifact) -> dict:
    return {
        "format_version": a.format_version,
        "recipe": a.recipe,
        "format": a.fmt.value,
        "alpha": a.alpha,
        "weight_granularity": a.weight_granularity,
        "model_hash": a.model_hash,
        "model_dtype": a.model_dtype,
        "include": list(a.include),
        "exclude": list(a.exclude),
        "layers": {n: {"in_features": s.in_features, "out_features": s.out_features} for n, s in a.layers.items()},
        "calibration": a.calibration,
        "source": a.source,
    }


def save_artifact(artifact: QuantArtifact, path: str | Path) -> Path:
    """Write the artifact to `path` (a temporary file beside it, renamed into place)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    tensors: dict[str, Tensor] = {}
    for name, s in artifact.layers.items():
        tensors[f"{name}.input_scale"] = s.input_scale.detach().float().cpu().reshape(()).contiguous()
        tensors[f"{name}.weight_scale"] = s.weight_scale.detach().float().cpu().reshape(-1).contiguous()
        if s.smooth is not None:
            tensors[f"{name}.smooth"] = s.smooth.detach().float().cpu().reshape(-1).contiguous()
        if s.weight_probe is not None:
            tensors[f"{name}.weight_probe"] = s.weight_probe.detach().float().cpu().reshape(-1).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(_metadata(artifact), ensure_ascii=False)})
    return path


_COUNT = {"type": "integer", "minimum": 1, "maximum": 1 << 20}
_PATTERNS = {"type": "array", "maxItems": 1024, "items": {"type": "string", "maxLength": 1000}}
# Known keys are typed strictly; others are allowed so later writers can add information within a version.
ARTIFACT_SCHEMA = {
    "type": "object",
    "required": ["format_version", "recipe", "format", "alpha", "weight_granularity", "model_hash", "model_dtype",
                 "include", "exclude", "layers", "calibration"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "recipe": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,31}$"},
        "format": {"enum": [f.value for f in QuantFormat]},
        "alpha": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": 1}]},
        "weight_granularity": {"enum": ["per_channel", "per_tensor"]},
        "model_hash": SHA256,
        "model_dtype": {"enum": ["float32", "bfloat16", "float16"]},
        "include": _PATTERNS,
        "exclude": _PATTERNS,
        "layers": {"type": "object", "minProperties": 1, "maxProperties": 100_000,
                   "propertyNames": {"type": "string", "maxLength": 500},
                   "additionalProperties": {
                       "type": "object", "required": ["in_features", "out_features"], "additionalProperties": False,
                       "properties": {"in_features": _COUNT, "out_features": _COUNT}}},
        "calibration": {"type": "object"},
        "source": {"type": "object", "properties": {"file": {"type": "string", "maxLength": 500},
                                                    "size": {"type": "integer", "minimum": 0}, "sha256": SHA256}},
    },
}
_TENSOR_KINDS = ("input_scale", "weight_scale", "smooth", "weight_probe")


def load_artifact(path: str | Path) -> QuantArtifact:
    """Read an artifact written by `save_artifact`: untrusted input, checked before use.

    The safetensors container checks its own header and lengths; the metadata is checked against
    `ARTIFACT_SCHEMA`; every tensor must belong to a listed layer, have its layer's shape, be float32,
    finite, and (scales, smoothing factors) positive. Errors name the file and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"quantization artifact {path} is a directory, not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"quantization artifact {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ArtifactError(f"{path} is not a safetensors file: {e}") from e
    if raw is None:
        raise ArtifactError(f"{path} has no '{METADATA_KEY}' metadata: not a step1x-export quantization artifact")
    meta = parse_json(raw, f"{path} metadata", error=ArtifactError)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version}, this step1x-export reads {FORMAT_VERSION}")
    check_schema(meta, ARTIFACT_SCHEMA, f"{path} metadata", error=ArtifactError)
    check_tensors(path, meta["layers"], tensors)
    layers = {
        name: LayerScales(
            in_features=dims["in_features"], out_features=dims["out_features"],
            input_scale=tensors[f"{name}.input_scale"], weight_scale=tensors[f"{name}.weight_scale"],
            smooth=tensors.get(f"{name}.smooth"), weight_probe=tensors.get(f"{name}.weight_probe"),
        )
        for name, dims in meta["layers"].items()
    }
    return QuantArtifact(
        recipe=meta["recipe"], fmt=QuantFormat(meta["format"]), model_hash=meta["model_hash"],
        model_dtype=meta["model_dtype"], layers=layers, include=tuple(meta["include"]),
        exclude=tuple(meta["exclude"]), alpha=meta["alpha"], weight_granularity=meta["weight_granularity"],
        calibration=meta["calibration"], format_version=version, source=meta.get("source", {}),
    )


def check_tensors(path: Path, layers: dict[str, dict], tensors: dict[str, Tensor]) -> None:
    """Each tensor belongs to a listed layer and has its shape; scales are finite and positive."""
    for key in tensors:
        layer, _, kind = key.rpartition(".")
        if layer not in layers or kind not in _TENSOR_KINDS:
            raise ArtifactError(f"{path}: tensor {key} belongs to no layer listed in the metadata")
    for name, dims in layers.items():
        n, k = dims["out_features"], dims["in_features"]
        shapes = {"input_scale": [()], "weight_scale": [(n,), (1,)], "smooth": [(k,)], "weight_probe": [(PROBE_SIZE,)]}
        for kind, allowed in shapes.items():
            t = tensors.get(f"{name}.{kind}")
            if t is None:
                if kind in ("input_scale", "weight_scale"):
                    raise ArtifactError(f"{path}: layer {name} lacks tensor {name}.{kind}")
                continue
            if t.dtype != torch.float32 or tuple(t.shape) not in allowed:
                raise ArtifactError(f"{path}: {name}.{kind} is {t.dtype} {list(t.shape)}; expected float32 of "
                                    f"shape {' or '.join(str(list(a)) for a in allowed)}")
            if not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{path}: {name}.{kind} holds NaN or infinity")
            if kind != "weight_probe" and not bool((t > 0).all()):
                raise ArtifactError(f"{path}: {name}.{kind} holds a zero or negative value; scales must be > 0")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
