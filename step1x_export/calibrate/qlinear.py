"""W8A8 Linear modules: static per-tensor activation scale, per-channel (or per-tensor) weight scale.

`QuantLinear.from_linear` quantizes a float `nn.Linear` with scales from a calibration artifact.
Which GEMM runs is decided in one place, `select_kernel`:
- FP8 E4M3 on CUDA with compute capability >= 8.9: `torch._scaled_mm` (fp8 x fp8, fp32 accumulate);
- INT8 on CUDA: `torch._int_mm` (int8 x int8 -> int32) with the weight column-major (`w[N, K].t()`),
  which ran 733 TOP/s on an H200 against 127 with a row-major weight;
- anywhere else: an exact emulation of the Q/DQ graph, as ONNX and TensorRT define it:
  quantize x with the static scale, dequantize x and the weight to float32, matmul in float32.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import QuantFormat, dequantize, quantize


class Kernel(str, Enum):
    SCALED_MM = "scaled_mm"
    INT_MM = "int_mm"
    EMULATE = "emulate"


def select_kernel(fmt: QuantFormat, device: torch.device, in_features: int, out_features: int) -> Kernel:
    """The GEMM a quantized Linear uses on `device` (the only place this is decided)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return Kernel.EMULATE
    if fmt is QuantFormat.FP8_E4M3:
        # _scaled_mm needs sm89+ (Ada / Hopper) and both GEMM dims of the weight divisible by 16.
        ok = torch.cuda.get_device_capability(device) >= (8, 9) and in_features % 16 == 0 and out_features % 16 == 0
        return Kernel.SCALED_MM if ok else Kernel.EMULATE
    # _int_mm needs K and N divisible by 8 (M > 16 is handled by padding rows).
    return Kernel.INT_MM if in_features % 8 == 0 and out_features % 8 == 0 else Kernel.EMULATE


class QuantLinear(nn.Module):
    """y = dequant(quant(x * smooth_inv)) @ dequant(weight).T + bias, computed as `kernel` says.

    Buffers: `weight` [N, K] in the storage dtype (float8_e4m3fn / int8), `weight_scale` float32 [N]
    (per channel) or [1] (per tensor), `input_scale` float32 [] (static, from calibration),
    `smooth_inv` float32 [K] (SmoothQuant's 1/s; None when the recipe does not smooth),
    `bias` [N] in the original Linear's dtype (or None).
    """

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, *, bias: bool, per_channel: bool,
                 smooth: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, QuantFormat(fmt)
        self.out_dtype = dtype
        kw = {"device": device}
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.fmt.storage_dtype, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1, **kw))
        self.register_buffer("input_scale", torch.ones((), **kw))
        self.register_buffer("smooth_inv", torch.ones(in_features, **kw) if smooth else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self._kernel: tuple[torch.device, Kernel] | None = None  # (device it was chosen for, kernel)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat, *, input_scale: Tensor, weight_scale: Tensor,
                    smooth: Tensor | None = None) -> QuantLinear:
        """Quantize `linear`'s weight (times the smoothing factors, if any) with the given scales."""
        n, k = linear.out_features, linear.in_features
        if weight_scale.numel() not in (1, n):
            raise ValueError(f"weight_scale has {weight_scale.numel()} values; {linear} needs 1 or {n}")
        if smooth is not None and smooth.numel() != k:
            raise ValueError(f"smoothing factors have {smooth.numel()} values; {linear} needs {k}")
        w = linear.weight.detach()
        q = cls(k, n, fmt, bias=linear.bias is not None, per_channel=weight_scale.numel() == n,
                smooth=smooth is not None, dtype=w.dtype, device=w.device)
        dev = w.device
        q.input_scale.copy_(input_scale.to(dev, torch.float32).reshape(()))
        q.weight_scale.copy_(weight_scale.to(dev, torch.float32).reshape(-1))
        if smooth is not None:
            s = smooth.to(dev, torch.float32)
            q.smooth_inv.copy_(1.0 / s)
            w = w.float() * s[None, :]
        q.weight.copy_(quantize_weight(w, q.weight_scale, q.fmt))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    @property
    def kernel(self) -> Kernel:
        # Chosen once per device, not per call: querying the GPU in forward would break torch.compile graphs.
        device = self.weight.device
        if self._kernel is None or self._kernel[0] != device:
            self._kernel = (device, select_kernel(self.fmt, device, self.in_features, self.out_features))
        return self._kernel[1]

    def use_kernel(self, kernel: Kernel | None) -> QuantLinear:
        """Force a GEMM on the current device (e.g. the emulation, to check a GPU kernel against it);
        None goes back to `select_kernel`'s choice."""
        self._kernel = None if kernel is None else (self.weight.device, Kernel(kernel))
        return self

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth_inv is not None:
            x2 = x2 * self.smooth_inv
        xq = quantize(x2, self.input_scale, self.fmt)
        y = _GEMMS[self.kernel](xq, self)  # float32, or bf16 from rowwise _scaled_mm
        if y.dtype != x.dtype:
            # One rounding to x.dtype after the bias, as the Q/DQ graph does. When the GEMM already returns
            # x.dtype (bf16 rowwise FP8), `y + bias` is that same single rounding (bf16 adds run in float32),
            # so the [M, N] output skips a bf16 -> fp32 -> bf16 round trip: two full passes over it per call.
            y = y.float()
        if self.bias is not None:
            y = y + self.bias  # promotes a bf16 bias to y's dtype inside the add: no separate cast
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        wgran = "per-channel" if self.weight_scale.numel() > 1 else "per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.value} W8A8, "
                f"weight={wgran}, activation=static per-tensor, smooth={self.smooth_inv is not None}, "
                f"bias={self.bias is not None}, kernel={self.kernel.value}")


def quantize_weight(w: Tensor, weight_scale: Tensor, fmt: QuantFormat) -> Tensor:
    """[N, K] float weight -> storage dtype, scale per output row (or one for all)."""
    scale = weight_scale.float().reshape(-1, 1) if weight_scale.numel() > 1 else weight_scale.float().reshape(())
    return quantize(w, scale, fmt)


def _weight_scale_row(q: QuantLinear) -> Tensor:
    return q.weight_scale.reshape(1, -1) if q.weight_scale.numel() > 1 else q.weight_scale.reshape(())


def _emulate(xq: Tensor, q: QuantLinear) -> Tensor:
    x = dequantize(xq, q.input_scale)
    w = dequantize(q.weight, q.weight_scale.reshape(-1, 1) if q.weight_scale.numel() > 1 else q.weight_scale)
    return F.linear(x, w)


def _scaled_mm(xq: Tensor, q: QuantLinear) -> Tensor:
    # torch._scaled_mm(a [M, K] row-major, b [K, N] column-major, scale_a, scale_b, bias=, out_dtype=).
    # Per-tensor x per-tensor: scalar scales. Per-channel weights need "rowwise" scaling, for which
    # both scales must be rowwise ([M, 1] and [1, N]) and the output bf16.
    m = xq.shape[0]
    if q.weight_scale.numel() == 1:
        return torch._scaled_mm(xq, q.weight.t(), scale_a=q.input_scale, scale_b=q.weight_scale.reshape(()),
                                out_dtype=torch.float32)
    scale_a = q.input_scale.reshape(1, 1).expand(m, 1).contiguous()
    return torch._scaled_mm(xq, q.weight.t(), scale_a=scale_a, scale_b=q.weight_scale.reshape(1, -1),
                            out_dtype=torch.bfloat16)


def _int_mm(xq: Tensor, q: QuantLinear) -> Tensor:
    # torch._int_mm(a [M, K] int8, b [K, N] int8) -> int32 [M, N]; CUDA wants M > 16: pad rows.
    m = xq.shape[0]
    if m <= 16:
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, q.weight.t())[:m]
    return acc.float() * (q.input_scale * _weight_scale_row(q))


_GEMMS = {Kernel.EMULATE: _emulate, Kernel.SCALED_MM: _scaled_mm, Kernel.INT_MM: _int_mm}
