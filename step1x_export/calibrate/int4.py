"""Group-wise 4-bit weights: the DiT's blocks (and the MLLM's Linears) at a quarter of their bf16 bytes.

The format is torch's own W4A16 format (tinygemm's, which torchao's int4 weight-only layout wraps): each row of
W [N, K] is cut into groups of `group_size` consecutive input channels; a group stores 4-bit codes q in [0, 15]
with one bf16 scale and one bf16 zero, and w = (q - 8) * scale + zero. Asymmetric, because a group of 128 weights
is rarely centred (a symmetric grid wastes part of its 16 levels); bf16 scale and zero because that is what the
kernels take (`torch._weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on the host) and because a
bf16 scale's rounding (2^-9 relative) is far below the 4-bit step (1/15 of the range). Group size 128: the
common choice (GPTQ, AWQ, torchao's default), 0.25 bit of scale and zero per weight (4.25 bits per weight) and
it divides every width of the 12B DiT (3072, 12288, 15360); a layer whose input width it does not divide takes
the largest of 64 and 32 that does (the toy's 96-wide layers: 32).

Stored plainly, not in a kernel's tile layout: codes two per byte along K (the even channel in the high nibble),
scales and zeros [N, K / group]. Plain tensors stream (pinned host memory, safetensors) and are repacked for a
kernel on the device they run on; torchao's tensor subclasses would tie the file to one kernel's layout.

Where the codes run: a DiT GEMM (thousands of rows) dequantizes the layer into the compute dtype just before the
ordinary GEMM (`dequantize_int4`); a call with at most `W4A16_MAX_ROWS` rows (the MLLM generating text, 1-2
rows) uses torch's W4A16 kernel when the device has one, which reads the 4-bit codes directly.

`clip_search`: per group, the range [lo, hi] shrunk by the factor in `CLIP_RATIOS` that minimises the group's
squared weight error (the data-free half of AWQ's clipping search); see `tests/test_int4.py` for what it buys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .qlinear import WEIGHT_CHUNK
from .weight_only import set_submodule

INT4_GROUP = 128
GROUP_FALLBACKS = (64, 32)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
W4A16_MAX_ROWS = 16  # text generation's GEMMs: 1-2 rows; a DiT call's thousands of rows dequantize instead
W4A16_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.bfloat16, torch.float32)}  # what the kernels take
_LEVELS = 15


def int4_group(in_features: int, preferred: int = INT4_GROUP) -> int | None:
    """`preferred` if it divides the layer's input width, else the largest fallback that does (None: none does)."""
    return next((g for g in (preferred, *GROUP_FALLBACKS) if g <= preferred and in_features % g == 0), None)


def group_size_for(in_features: int, preferred: int = INT4_GROUP) -> int:
    """`int4_group`, raising where no group divides the width."""
    group = int4_group(in_features, preferred)
    if group is not None:
        return group
    raise ValueError(f"a 4-bit layer needs its input width divisible by {preferred} or one of {GROUP_FALLBACKS}; "
                     f"got {in_features}")


def _grid(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 scale and zero mapping [lo, hi] onto the 16 levels (w = (q - 8) * scale + zero)."""
    scale = ((hi - lo) / _LEVELS).clamp_min(1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    return scale, zero


def _codes(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Nearest codes for float32 groups [.., G, g] under the stored (bf16) scale and zero."""
    return ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, _LEVELS)


def _quantize_rows(w: Tensor, group: int, clip_search: bool) -> tuple[Tensor, Tensor, Tensor]:
    wg = w.float().reshape(w.shape[0], -1, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best = None
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        scale, zero = _grid(lo * ratio, hi * ratio)
        q = _codes(wg, scale, zero)
        err = ((q - 8) * scale.float()[..., None] + zero.float()[..., None] - wg).square_().sum(-1)
        if best is None:
            best = [err, q, scale, zero]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better, scale, best[2])
        best[3] = torch.where(better, zero, best[3])
    assert best is not None
    q = best[1].to(torch.uint8).reshape(w.shape[0], -1)
    return (q[:, 0::2] << 4) | q[:, 1::2], best[2], best[3]


def quantize_int4(w: Tensor, group: int, *, clip_search: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """[N, K] float weight -> (codes uint8 [N, K/2], scale bf16 [N, K/group], zero bf16 [N, K/group]),
    a block of rows at a time (float32 scratch of `WEIGHT_CHUNK` elements, not of the whole layer)."""
    n, k = w.shape
    if k % group or group % 2:
        raise ValueError(f"group size {group} must be even and divide the input width {k}")
    step = max(1, WEIGHT_CHUNK // max(k, 1))
    parts = [_quantize_rows(w[i:i + step], group, clip_search) for i in range(0, n, step)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]


def unpack_int4(codes: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K] in [0, 15]."""
    return torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(codes.shape[0], -1)


def dequantize_int4(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, K] in `dtype`: (q - 8) * scale + zero computed in float32 per element, rounded once."""
    q = unpack_int4(codes)
    group = q.shape[1] // scale.shape[1]
    w = (q.float() - 8).reshape(q.shape[0], -1, group) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(q.shape).to(dtype)


# -- GPTQ (Frantar et al. 2023) ----------------------------------------------------------------------------------
# Each column rounded in turn, its rounding error spread over the columns not yet rounded, weighted by the layer's
# input statistics H = sum x x^T (`calibrate.hessians`), so the layer's output on the calibration inputs moves as
# little as 4 bits allow; nearest rounding, even with the best range per group, ignores which channels the inputs
# load. Group-wise as stored here: a group's scale and zero come from its weights as the error feedback has left
# them when its first column is reached (with the range search), the usual GPTQ grouping.

DAMP = 0.01  # of H's mean diagonal, added to its diagonal: keeps the inverse finite for rarely used channels


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of H^-1 (damped): row j holds how column j's error moves the later columns."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # a channel no input ever used: its weights do not matter
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def gptq_int4(w: Tensor, group: int, hessian: Tensor, *, damp: float = DAMP, clip_search: bool = True
              ) -> tuple[Tensor, Tensor, Tensor]:
    """[N, K] weight -> `int4`'s (codes uint8 [N, K/2], scale bf16 [N, K/g], zero bf16 [N, K/g]), by GPTQ."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the layer's input width is {k}")
    inv = _inverse_cholesky(hessian.to(w.device), damp)
    work = w.detach().float().clone()
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for start in range(0, k, group):
        _, scale, zero = quantize_int4(work[:, start:start + group], group, clip_search=clip_search)
        scales.append(scale)
        zeros.append(zero)
        s, z = scale.float()[:, 0], zero.float()[:, 0]
        for j in range(start, start + group):
            q = _codes(work[:, j, None, None], scale, zero)[:, 0, 0]
            codes[:, j] = q.to(torch.uint8)
            err = (work[:, j] - ((q - 8) * s + z)) / inv[j, j]
            work[:, j + 1:] -= err[:, None] * inv[j, j + 1:][None, :]
    return (codes[:, 0::2] << 4) | codes[:, 1::2], torch.cat(scales, 1), torch.cat(zeros, 1)


def w4a16_available(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether torch's W4A16 kernel takes this layer on `device`: on CUDA (tinygemm) the packed layout needs K a
    multiple of 128 (8 inner k-tiles of 16) and N of 8; the host kernel takes any even K."""
    if device.type == "cuda":
        return in_features % 128 == 0 and out_features % 8 == 0
    return device.type == "cpu"


def w4a16_pack(codes: Tensor) -> Tensor:
    """The codes in the W4A16 kernel's layout for their device (what `torch._weight_int4pack_mm*` reads)."""
    if codes.device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(codes.contiguous(), 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(codes).to(torch.int32), 1)


def w4a16_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """x [M, K] @ dequant(W).T with the codes read by torch's W4A16 kernel (scale and zero in x's dtype)."""
    group = x.shape[-1] // scale.shape[1]
    scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(x.dtype).contiguous()  # [K/g, N, 2]
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)


class Int4Linear(nn.Module):
    """y = x @ dequant(W).T + bias with W stored in group-wise 4 bits (torch's W4A16 format).

    Buffers: `weight` uint8 [N, K/2] (two codes a byte), `weight_scale` and `weight_zero` bf16 [N, K/group],
    `bias` [N] in the compute dtype (or None). `w4a16`: calls of at most `W4A16_MAX_ROWS` rows read the codes
    with torch's W4A16 kernel (the MLLM's text generation); the kernel's packed copy is made when the module
    is built or moved (`choose_kernel`), never inside forward.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, *, bias: bool, w4a16: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"group size {group_size} must be even and divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size, self.w4a16 = in_features, out_features, group_size, w4a16
        kw = {"device": device}
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.bfloat16, **kw))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.bfloat16, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self._packed: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP, *, clip_search: bool = False,
                    w4a16: bool = False, hessian: Tensor | None = None) -> Int4Linear:
        """`hessian` (the layer's sum of x x^T over calibration inputs): the codes by GPTQ; else nearest rounding."""
        w = linear.weight.detach()
        group = group_size_for(linear.in_features, group_size)
        q = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None, w4a16=w4a16,
                dtype=w.dtype, device=w.device)
        if hessian is not None:
            codes, scale, zero = gptq_int4(w, group, hessian, clip_search=clip_search)
        else:
            codes, scale, zero = quantize_int4(w, group, clip_search=clip_search)
        q.weight.copy_(codes)
        q.weight_scale.copy_(scale)
        q.weight_zero.copy_(zero)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q.choose_kernel()

    def choose_kernel(self) -> Int4Linear:
        """The W4A16 kernel's packed codes for the current device (only when asked for and available)."""
        device = self.weight.device
        usable = self.w4a16 and w4a16_available(device, self.in_features, self.out_features)
        self._packed = w4a16_pack(self.weight) if usable else None
        return self

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature): the packed copy follows the device
        out = super()._apply(fn, recurse)
        self.choose_kernel()
        return out

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        few_rows = x2.shape[0] <= W4A16_MAX_ROWS and x.dtype in W4A16_DTYPES.get(x.device.type, ())
        if self._packed is not None and few_rows:
            y = w4a16_matmul(x2, self._packed, self.weight_scale, self.weight_zero)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            w = dequantize_int4(self.weight, self.weight_scale, self.weight_zero, x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format=int4 weight-only, "
                f"group={self.group_size} (bf16 scale + zero), bias={self.bias is not None}, "
                f"w4a16={self._packed is not None}")


def quantize_int4_(model: nn.Module, names: list[str], group_size: int = INT4_GROUP, *, clip_search: bool = False,
                   w4a16: bool = False, hessians: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Replace, in place, each named nn.Linear by an `Int4Linear` (freed one by one); returns `model`.
    With `hessians` (`hessians.collect_hessians`), each layer's codes by GPTQ over its own."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"4-bit layer {name}: the model has {type(linear).__name__} there, expected nn.Linear")
        hessian = hessians[name] if hessians is not None else None
        set_submodule(model, name, Int4Linear.from_linear(linear, group_size, clip_search=clip_search, w4a16=w4a16,
                                                          hessian=hessian))
        del linear
    return model
