"""Apply a `QuantArtifact` to a torch model: swap the selected nn.Linear modules for `QuantLinear`."""

from __future__ import annotations

from torch import nn

from ..hashing import FileIdentity, module_hash
from .artifact import QuantArtifact, dtype_name
from .qlinear import QuantLinear
from .weight_only import set_submodule


def check_model_hash(model: nn.Module, artifact: QuantArtifact) -> None:
    got = module_hash(model)
    if got != artifact.model_hash:
        raise ValueError(
            f"quantization artifact was calibrated on model {artifact.model_hash} ({artifact.model_dtype}) "
            f"but this model hashes to {got}: other weights or another dtype; recalibrate, or load the model "
            f"as it was calibrated"
        )


def check_source(model: nn.Module, artifact: QuantArtifact, source: FileIdentity) -> None:
    """The artifact's recorded source file and dtype against the file the model was loaded from (no tensor hashing)."""
    got = artifact.source.get("sha256")
    if got != source.sha256:
        calibrated = (f"{artifact.source.get('file')} (sha256 {got[:12]})" if got
                      else f"model {artifact.model_hash[:12]} (built in code, no file)")
        raise ValueError(f"quantization artifact was calibrated on {calibrated}, but the model was loaded from "
                         f"{source.name} (sha256 {source.sha256[:12]}): recalibrate on this checkpoint")
    dtype = dtype_name(next(model.parameters()).dtype)
    if dtype != artifact.model_dtype:
        raise ValueError(f"quantization artifact was calibrated in {artifact.model_dtype}, the model is loaded in "
                         f"{dtype}: load it as it was calibrated")


def quantize_model(model: nn.Module, artifact: QuantArtifact, *, check_hash: bool = True,
                   source: FileIdentity | None = None) -> nn.Module:
    """Replace, in place, each Linear named in `artifact` by a `QuantLinear`; returns `model`.

    With `source` (the identity of the file the model was loaded from) the check compares file identities;
    otherwise `check_hash` hashes the model's tensors (cheap for the tiny models only).
    """
    if source is not None:
        check_source(model, artifact, source)
    elif check_hash:
        check_model_hash(model, artifact)
    for name, s in artifact.layers.items():
        # Looked up one at a time (no table of every module): a swapped-out Linear is freed before the
        # next one is quantized, so peak memory is the model plus one layer, not the model plus its copy.
        linear = _submodule(model, name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"artifact layer {name}: the model has {type(linear).__name__ if linear else 'nothing'} "
                             f"there, expected nn.Linear")
        if (linear.in_features, linear.out_features) != (s.in_features, s.out_features):
            raise ValueError(f"artifact layer {name} is {s.in_features}->{s.out_features}, "
                             f"the model's is {linear.in_features}->{linear.out_features}")
        q = QuantLinear.from_linear(linear, artifact.fmt, input_scale=s.input_scale, weight_scale=s.weight_scale,
                                    smooth=s.smooth)
        set_submodule(model, name, q)
        del linear
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
