"""Fallback FP8 GEMMs for the ladder: per-tensor scales, weight static, activation dynamic, `torch._scaled_mm`.

This is NOT the calibrated W8A8 recipe of `step1x_export.calibrate` (static activation scales from a
calibration set); the ladder uses it only when that package cannot quantize the model, and labels the
row so. It needs a GPU with FP8 tensor cores (compute capability >= 8.9).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448

# Per-token GEMMs of the DiT blocks. Modulation layers act on one vector per sample: nothing to gain.
DEFAULT_PATTERN = r"^(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])$"


class Fp8DynamicLinear(nn.Module):
    """y = (x_q * s_x) @ (w_q * s_w)^T + b with E4M3 x_q, w_q; s_x = amax(x)/448 per call, s_w fixed."""

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight_fp8", weight_fp8)  # [N, K] row-major; passed to _scaled_mm as [K, N] col-major
        self.register_buffer("weight_scale", weight_scale)  # float32 scalar
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype
        self.in_features, self.out_features = weight_fp8.shape[1], weight_fp8.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8DynamicLinear:
        w = linear.weight.detach()
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise ValueError(f"FP8 GEMM needs dims that are multiples of 16, got weight {tuple(w.shape)}")
        scale = (w.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
        w_fp8 = (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        bias = None if linear.bias is None else linear.bias.detach().to(w.dtype)
        return cls(w_fp8, scale, bias, w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = (x2.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
        x_fp8 = (x2.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, format=fp8_e4m3 W8A8 per-tensor "
                f"(weight static, activation dynamic), out={self.out_dtype}")


def quantize_fp8_dynamic_(model: nn.Module, pattern: str = DEFAULT_PATTERN) -> list[str]:
    """Swap every nn.Linear whose qualified name matches `pattern`; returns the swapped names.

    The bf16 weights are dropped (the swap is one-way), so peak memory reflects an FP8 model.
    """
    regex = re.compile(pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.match(n)]
    if not names:
        raise ValueError(f"FP8 pattern {pattern!r} matched no nn.Linear of {type(model).__name__}")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, Fp8DynamicLinear.from_linear(getattr(parent, leaf)))
    return names
