"""Weight-only 8-bit Linear layers: 8-bit weights with per-output-channel scales, compute in the model's dtype.

For layers where an 8-bit GEMM buys nothing but the weights cost memory: the modulation Linears of
the DiT (3.2 B parameters acting on one vector per sample) and the Qwen2.5-VL MLLM (run once per
edit). No calibration data is needed: the scale of row n is amax(|W[n]|) / qmax. The forward
dequantizes the weight into the compute dtype (exact: every int8 and float8_e4m3fn value is a bf16
value; one rounding for the scale) and runs the ordinary GEMM, so the only extra memory is one
layer's weight in the compute dtype while that layer runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import QuantFormat, scale_from_amax
from .qlinear import WEIGHT_CHUNK, quantize_weight

# The names options use for a weight-only format ("none": keep the layers as loaded).
WEIGHT_ONLY_FORMATS: dict[str, QuantFormat | None] = {"none": None, "fp8": QuantFormat.FP8_E4M3,
                                                      "int8": QuantFormat.INT8}


def parse_weight_only(value: str | None, option: str) -> QuantFormat | None:
    if value is None:
        return None
    if value not in WEIGHT_ONLY_FORMATS:
        raise ValueError(f"unknown {option} {value!r}; choose one of {', '.join(WEIGHT_ONLY_FORMATS)}")
    return WEIGHT_ONLY_FORMATS[value]


class WeightOnlyLinear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, the weight stored in 8 bits.

    Buffers: `weight` [N, K] float8_e4m3fn / int8, `weight_scale` float32 [N], `bias` [N] in the
    compute dtype (or None).
    """

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, *, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, QuantFormat(fmt)
        kw = {"device": device}
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.fmt.storage_dtype, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat) -> WeightOnlyLinear:
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None, dtype=w.dtype,
                device=w.device)
        q.weight_scale.copy_(scale_from_amax(row_amax(w), q.fmt))
        quantize_weight(w, q.weight_scale, q.fmt, out=q.weight)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.value} "
                f"weight-only, weight=per-channel, bias={self.bias is not None}")


def row_amax(w: Tensor) -> Tensor:
    """max |w[n, :]| per row, float32, a block of rows at a time (no float32 copy of the whole weight)."""
    step = max(1, WEIGHT_CHUNK // max(w.shape[1], 1))
    return torch.cat([w[i:i + step].float().abs().amax(dim=1) for i in range(0, w.shape[0], step)])


def quantize_weights_(model: nn.Module, names: list[str], fmt: QuantFormat) -> nn.Module:
    """Replace, in place, each named nn.Linear by a `WeightOnlyLinear` (freed one by one); returns `model`."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            got = type(linear).__name__
            raise ValueError(f"weight-only layer {name}: the model has {got} there, expected nn.Linear")
        set_submodule(model, name, WeightOnlyLinear.from_linear(linear, fmt))
        del linear
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
