"""W8A8 Linear modules: static per-tensor activation scale, per-channel (or per-tensor) weight scale.

`QuantLinear.from_linear` quantizes a float `nn.Linear` with scales from a calibration artifact.
Which GEMM runs is decided in one place, `select_kernel`, when the module is built or moved to a
device (never inside forward, so a compiled or captured forward sees a fixed choice):
- FP8 E4M3 on CUDA with compute capability >= 8.9: `torch._scaled_mm` (fp8 x fp8), bf16 output with the
  bias fused and fast accumulation; a CUDA GPU without FP8 is refused (`UnsupportedKernelError`);
- INT8 on CUDA: `torch._int_mm` (int8 x int8 -> int32) with the weight column-major (`w[N, K].t()`),
  then one pass that scales, adds the bias and rounds to bf16 (`torch.addcmul` into a bf16 output:
  the arithmetic runs in float32 per element, no float32 [M, N] tensor is made; compiled, it is one
  pointwise op that inductor can fuse into the GEMM's epilogue);
- anywhere else: an exact emulation of the Q/DQ graph, as ONNX and TensorRT define it:
  quantize x with the static scale, dequantize x and the weight to float32, matmul in float32.

The GPU kernels quantize activations with one multiply by smooth_inv / input_scale, folded into one
float32 [K] vector (or scalar): the product is computed in float32 per element and rounded once into
the compute dtype, then saturated and cast. The folded scale stays float32: rounded to bf16 it would
scale every activation of the layer by the same factor (up to 1 +- 2^-8), a fixed gain error that the
float32 dequantization does not undo. Every scale reaching a GEMM or its epilogue is float32.

The derived tensors (`_act_mul`, `_out_scale`) are updated in place when recomputed on the same
device, so a CUDA graph captured over this module keeps reading live memory after a `.to()`.
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


class UnsupportedKernelError(ValueError):
    """The GPU cannot run the asked-for 8-bit GEMM (FP8 W8A8 needs FP8 tensor cores)."""


FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer


def select_kernel(fmt: QuantFormat, device: torch.device, in_features: int, out_features: int,
                  out_dtype: torch.dtype = torch.bfloat16) -> Kernel:
    """The GEMM a quantized Linear uses on `device` (the only place this is decided)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return Kernel.EMULATE
    if fmt is QuantFormat.FP8_E4M3:
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_CAPABILITY:
            raise UnsupportedKernelError(
                f"FP8 W8A8 needs FP8 tensor cores (compute capability >= 8.9); {torch.cuda.get_device_name(device)} "
                f"is {capability[0]}.{capability[1]}: calibrate with the int8-sq recipe instead")
        # _scaled_mm needs both GEMM dims divisible by 16, and a bf16 output for per-channel scales.
        ok = in_features % 16 == 0 and out_features % 16 == 0 and out_dtype == torch.bfloat16
        return Kernel.SCALED_MM if ok else Kernel.EMULATE
    # _int_mm needs K and N divisible by 8 (M > 16 is handled by padding rows).
    ok = in_features % 8 == 0 and out_features % 8 == 0 and out_dtype in (torch.bfloat16, torch.float16)
    return Kernel.INT_MM if ok else Kernel.EMULATE


class QuantLinear(nn.Module):
    """y = dequant(quant(x * smooth_inv)) @ dequant(weight).T + bias, computed as `kernel` says.

    Buffers: `weight` [N, K] in the storage dtype (float8_e4m3fn / int8), `weight_scale` float32 [N]
    (per channel) or [1] (per tensor), `input_scale` float32 [] (static, from calibration),
    `smooth_inv` float32 [K] (SmoothQuant's 1/s; None when the recipe does not smooth),
    `bias` [N] in the original Linear's dtype (or None). `kernel` is chosen when the module is built
    and again whenever it moves to another device (`_apply`).
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
        self.kernel = Kernel.EMULATE
        self._forced: Kernel | None = None
        self.choose_kernel()

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
        s = None
        if smooth is not None:
            s = smooth.to(dev, torch.float32)
            q.smooth_inv.copy_(1.0 / s)
        quantize_weight(w, q.weight_scale, q.fmt, smooth=s, out=q.weight)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q.choose_kernel()

    def choose_kernel(self) -> QuantLinear:
        """Pick the GEMM for the current device and precompute what it needs (call after loading buffers)."""
        device = self.weight.device
        self.kernel = self._forced or (
            Kernel.EMULATE if device.type == "meta"
            else select_kernel(self.fmt, device, self.in_features, self.out_features, self.out_dtype))
        act_mul = out_scale = None
        if self.kernel is not Kernel.EMULATE:
            # x * (smooth_inv / input_scale): one float32 [K] (or scalar) multiply per call.
            inv = 1.0 / self.input_scale.float()
            act_mul = inv * self.smooth_inv.float() if self.smooth_inv is not None else inv
            out_scale = (self.input_scale * self.weight_scale).float().reshape(-1)  # int8: per-column scale
        self._act_mul = _refreshed(getattr(self, "_act_mul", None), act_mul)
        self._out_scale = _refreshed(getattr(self, "_out_scale", None), out_scale)
        return self

    def _apply(self, fn, recurse=True):
        """`.to(device)` / `.cuda()` move every buffer; a dtype change (`.to(torch.bfloat16)`, `.float()`) casts
        only the bias and the output dtype: the 8-bit weight and the float32 scales are the quantization itself
        (an FP8 weight cast to bf16 would silently un-quantize the layer). The kernel follows, once."""
        cast_to = None
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if name != "bias" and moved.dtype != buf.dtype:
                cast_to, moved = moved.dtype, buf.to(moved.device)
            self._buffers[name] = moved
        if self.bias is not None:
            self.out_dtype = self.bias.dtype
        elif cast_to is not None:
            self.out_dtype = cast_to
        self.choose_kernel()
        return self

    def use_kernel(self, kernel: Kernel | None) -> QuantLinear:
        """Force a GEMM on the current device (e.g. the emulation, to check a GPU kernel against it);
        None goes back to `select_kernel`'s choice."""
        self._forced = None if kernel is None else Kernel(kernel)
        return self.choose_kernel()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel is Kernel.EMULATE:
            y = _emulate(x2, self)
        else:
            y = _GEMMS[self.kernel](quantize_activation(x2.to(self.out_dtype), self._act_mul, self.fmt), self)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        wgran = "per-channel" if self.weight_scale.numel() > 1 else "per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.value} W8A8, "
                f"weight={wgran}, activation=static per-tensor, smooth={self.smooth_inv is not None}, "
                f"bias={self.bias is not None}, kernel={self.kernel.value}")


WEIGHT_CHUNK = 1 << 22  # elements quantized at a time: float32 temporaries of 16 MiB, not of the whole layer


def quantize_weight(w: Tensor, weight_scale: Tensor, fmt: QuantFormat, *, smooth: Tensor | None = None,
                    out: Tensor | None = None) -> Tensor:
    """[N, K] float weight (times smooth [K], if given) -> storage dtype, scale per output row (or one for all).

    Row blocks at a time (the maths is per element, so the result is the same bits): a 21504 x 3072 layer
    needs 16 MiB of float32 scratch, not 264 MiB.
    """
    n, k = w.shape
    out = torch.empty(n, k, dtype=fmt.storage_dtype, device=w.device) if out is None else out
    per_row = weight_scale.numel() > 1
    step = max(1, WEIGHT_CHUNK // max(k, 1))
    for i in range(0, n, step):
        block = w[i:i + step].float()
        if smooth is not None:
            block = block * smooth[None, :]
        scale = weight_scale[i:i + step].float().reshape(-1, 1) if per_row else weight_scale.float().reshape(())
        out[i:i + step] = quantize(block, scale, fmt)
    return out


def _refreshed(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    """`new`'s values in `old`'s memory when it can hold them (same shape, dtype, device), else `new`."""
    same = (old is not None and new is not None and old.shape == new.shape and old.dtype == new.dtype
            and old.device == new.device and old.device.type != "meta")
    return old.copy_(new) if same else new


def quantize_activation(x: Tensor, act_mul: Tensor, fmt: QuantFormat) -> Tensor:
    """x [M, K] in the compute dtype -> 8-bit, as x * act_mul saturated and rounded (two [M, K] temporaries).

    act_mul is float32, so the scale itself is never rounded. Compiled, the float32 product, saturation
    and cast are one fused kernel; eagerly the product is rounded once into x's dtype (`out=`) so no
    float32 [M, K] tensor is made (a double rounding before the 8-bit one, unbiased).
    """
    if torch.compiler.is_compiling():  # functional: inductor fuses it and frees nothing early
        y = x.float() * act_mul
        y = y.round().clamp(-128, 127) if fmt is QuantFormat.INT8 else y.clamp(-448.0, 448.0)
        return y.to(fmt.storage_dtype)
    y = torch.mul(x, act_mul, out=torch.empty_like(x))
    if fmt is QuantFormat.INT8:
        return y.round_().clamp_(-128, 127).to(torch.int8)
    return y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


def _emulate(x: Tensor, q: QuantLinear) -> Tensor:
    """The Q/DQ graph in float32: quantize x (smoothed), dequantize both, matmul, bias, one rounding."""
    x = x.float()
    if q.smooth_inv is not None:
        x = x * q.smooth_inv
    xd = dequantize(quantize(x, q.input_scale, q.fmt), q.input_scale)
    w = dequantize(q.weight, q.weight_scale.reshape(-1, 1) if q.weight_scale.numel() > 1 else q.weight_scale)
    y = F.linear(xd, w)
    return y if q.bias is None else y + q.bias  # a bf16 bias is promoted inside the add


def _scaled_mm(xq: Tensor, q: QuantLinear) -> Tensor:
    # torch._scaled_mm(a [M, K] row-major, b [K, N] column-major, scale_a, scale_b, bias=, out_dtype=):
    # bf16 out with the bias added in the epilogue, no float32 [M, N]. Per-channel weights need "rowwise"
    # scaling: both scales rowwise ([M, 1] and [1, N]).
    if q.weight_scale.numel() == 1:
        scale_a, scale_b = q.input_scale, q.weight_scale.reshape(())
    else:
        scale_a = q.input_scale.reshape(1, 1).repeat(xq.shape[0], 1)  # [M, 1], contiguous
        scale_b = q.weight_scale.reshape(1, -1)
    return torch._scaled_mm(xq, q.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=q.bias,
                            out_dtype=q.out_dtype, use_fast_accum=True)


def _int_mm(xq: Tensor, q: QuantLinear) -> Tensor:
    # torch._int_mm(a [M, K] int8, b [K, N] int8) -> int32 [M, N]; CUDA wants M > 16: pad rows.
    m = xq.shape[0]
    if m <= 16:
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, q.weight.t()).narrow(0, 0, m)
    if torch.compiler.is_compiling():  # one pointwise epilogue, fusable into the GEMM by inductor
        y = acc * q._out_scale if q.bias is None else torch.addcmul(q.bias.float(), acc, q._out_scale)
        return y.to(q.out_dtype)
    out = torch.empty(acc.shape, dtype=q.out_dtype, device=acc.device)
    if q.bias is None:
        return torch.mul(acc, q._out_scale, out=out)
    # bias + acc * scale computed in float32 per element and rounded once into the bf16 output.
    return torch.addcmul(q.bias.float(), acc, q._out_scale, out=out)


_GEMMS = {Kernel.SCALED_MM: _scaled_mm, Kernel.INT_MM: _int_mm}
