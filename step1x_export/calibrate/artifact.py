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
from .formats import QuantFormat

FORMAT_VERSION = 1
METADATA_KEY = "step1x_export.quant"


class ArtifactError(ValueError):
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


def load_artifact(path: str | Path) -> QuantArtifact:
    """Read an artifact written by `save_artifact`; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantization artifact {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is not a safetensors file: {e}") from e
    if raw is None:
        raise ArtifactError(f"{path} has no '{METADATA_KEY}' metadata: not a step1x-export quantization artifact")
    meta = json.loads(raw)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version}, this step1x-export reads {FORMAT_VERSION}")
    layers = {}
    for name, dims in meta["layers"].items():
        try:
            layers[name] = LayerScales(
                in_features=dims["in_features"], out_features=dims["out_features"],
                input_scale=tensors[f"{name}.input_scale"], weight_scale=tensors[f"{name}.weight_scale"],
                smooth=tensors.get(f"{name}.smooth"), weight_probe=tensors.get(f"{name}.weight_probe"),
            )
        except KeyError as e:
            raise ArtifactError(f"{path}: layer {name} lacks tensor {e}") from None
    return QuantArtifact(
        recipe=meta["recipe"], fmt=QuantFormat(meta["format"]), model_hash=meta["model_hash"],
        model_dtype=meta["model_dtype"], layers=layers, include=tuple(meta["include"]),
        exclude=tuple(meta["exclude"]), alpha=meta["alpha"], weight_granularity=meta["weight_granularity"],
        calibration=meta["calibration"], format_version=version,
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
