"""The 8-bit formats and their quantize / dequantize maths, with ONNX QuantizeLinear semantics.

One definition serves the torch modules, the CPU emulation and the ONNX Q/DQ initializers, so the
three agree bit for bit on what a quantized value is: q = saturate(round_half_even(x / scale)).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from ..precision import Precision


class QuantFormat(str, Enum):
    FP8_E4M3 = "fp8_e4m3"
    INT8 = "int8"

    @property
    def qmax(self) -> float:
        """Largest magnitude a scale maps amax onto (symmetric; int8 weights use [-127, 127])."""
        return 448.0 if self is QuantFormat.FP8_E4M3 else 127.0

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is QuantFormat.FP8_E4M3 else torch.int8

    @property
    def precision(self) -> Precision:
        return Precision.FP8 if self is QuantFormat.FP8_E4M3 else Precision.INT8


def quantize(x: Tensor, scale: Tensor, fmt: QuantFormat) -> Tensor:
    """ONNX QuantizeLinear (zero point 0, saturating): x / scale rounded half-to-even into `fmt`.

    `scale` broadcasts against x (a scalar, or [N, 1] for per-output-channel weights). Division,
    not multiplication by 1/scale, because that is what QuantizeLinear specifies.
    """
    y = x.float() / scale.float()
    if fmt is QuantFormat.INT8:
        return y.round().clamp(-128, 127).to(torch.int8)
    # A plain cast to float8_e4m3fn turns out-of-range values into NaN: saturate first.
    return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """ONNX DequantizeLinear (zero point 0) in float32."""
    return q.float() * scale.float()


def scale_from_amax(amax: Tensor, fmt: QuantFormat) -> Tensor:
    """Symmetric scale mapping amax onto the format's largest value; all-zero inputs get scale 1."""
    amax = amax.float()
    return torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax))
