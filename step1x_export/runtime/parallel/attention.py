"""Sequence-parallel attention: Ulysses (heads all-to-all) and ring attention (torch's own ring), combined.

Each rank holds a chunk of the joint [txt | img] sequence with RoPE already applied to its q and k
(the blocks rotate before calling SDPA), so attention over any order of the keys is the same
attention: unmasked softmax does not depend on where a key sits.

The blocks' `F.scaled_dot_product_attention` calls are routed here by a `TorchFunctionMode` (the
mechanism torch's own context parallelism uses), so the reference blocks run unchanged.

Why not `torch.distributed.tensor.experimental.context_parallel` itself (torch 2.13): it shards
module buffers in place along one sequence dim, while this DiT shards text and image tokens
separately and the RoPE table with them; and on CPU its ring is not used at all, because its
dispatch table knows only the CUDA SDPA kernels (flash, efficient, cuDNN): CPU attention falls back
to DTensor's generic rule, which all-gathers K and V. Its ring loop (`_templated_ring_attention`: K/V
rotated by functional collectives, a log-sum-exp merge) takes any SDPA kernel that returns the
log-sum-exp, so we call that loop directly with the kernel for this device: flash on CPU and for
bf16/fp16 on CUDA, memory-efficient for fp32 on CUDA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .layout import ParallelGroups

aten = torch.ops.aten


def _ring_loop():
    try:  # torch >= 2.9 keeps it here
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    except ImportError:  # older layout
        from torch.distributed.tensor.experimental import _attention as cp
    return cp


def heads_to_sequence(x: Tensor, group: dist.ProcessGroup, degree: int, counts: list[int] | None = None) -> Tensor:
    """[B, H, L/U, D] (all heads, my chunk) -> [B, H/U, L, D] (my heads, every chunk in rank order); `counts`:
    every rank's chunk length where they differ (v1.2's text length need not divide by the degree)."""
    if counts is not None and len(set(counts)) > 1:
        return _uneven_heads_to_sequence(x, group, degree, counts)
    b, h, n, d = x.shape
    send = x.reshape(b, degree, h // degree, n, d).transpose(0, 1).contiguous()
    recv = funcol.all_to_all_single(send, None, None, group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // degree, degree * n, d)


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup, degree: int, counts: list[int] | None = None) -> Tensor:
    """Inverse of `heads_to_sequence`: [B, H/U, L, D] -> [B, H, L/U, D]."""
    if counts is not None and len(set(counts)) > 1:
        return _uneven_sequence_to_heads(x, group, degree, counts)
    b, hu, n, d = x.shape
    send = x.reshape(b, hu, degree, n // degree, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = funcol.all_to_all_single(send, None, None, group)
    return recv.transpose(0, 1).reshape(b, degree * hu, n // degree, d)


def _uneven_heads_to_sequence(x: Tensor, group: dist.ProcessGroup, degree: int, counts: list[int]) -> Tensor:
    b, h, n, d = x.shape
    hu = h // degree
    send = x.reshape(b, degree, hu, n, d).transpose(0, 1).reshape(-1)  # head group j's rows go to rank j
    recv = funcol.all_to_all_single(send, [b * hu * c * d for c in counts], [b * hu * n * d] * degree, group)
    pieces = recv.split([b * hu * c * d for c in counts])
    return torch.cat([p.view(b, hu, c, d) for p, c in zip(pieces, counts, strict=True)], dim=2)


def _uneven_sequence_to_heads(x: Tensor, group: dist.ProcessGroup, degree: int, counts: list[int]) -> Tensor:
    b, hu, _, d = x.shape
    mine = counts[dist.get_rank(group)]
    send = torch.cat([p.reshape(-1) for p in x.split(counts, dim=2)])  # rank j's tokens of my heads go to rank j
    recv = funcol.all_to_all_single(send, [b * hu * mine * d] * degree, [b * hu * c * d for c in counts], group)
    return recv.view(degree, b, hu, mine, d).transpose(0, 1).reshape(b, degree * hu, mine, d)


def _kernel(q: Tensor) -> tuple[Any, dict[str, Any]]:
    """The SDPA kernel that returns (out, logsumexp, ...) for this device and dtype."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu, {}
    if q.dtype in (torch.float16, torch.bfloat16):
        return aten._scaled_dot_product_flash_attention, {}
    return _efficient_attention, {"attn_bias": None, "compute_log_sumexp": True}


def _efficient_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, ...]:
    """The memory-efficient kernel (fp32 on CUDA) with its log-sum-exp cut to the local token count: the
    kernel pads it to a multiple of 32 rows, and the ring's merge broadcasts it against the output."""
    out, lse, *rest = aten._scaled_dot_product_efficient_attention(q, k, v, **kwargs)
    return (out, lse.narrow(-1, 0, q.shape[-2]), *rest)


KEY_BIAS_DIMS = 8  # the extra head dims that carry a key's bias: FlashAttention takes head dims in 8s


def with_key_bias(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with `key_bias` [L] (0: a key, -inf: padding) folded in as an extra head dimension: q gains 1,
    k the bias, v 0, so every score gains the key's bias and the output's extra dims are 0. The ring rotates it
    with K, which a mask argument would not follow. Call the kernel with the original dims' scale."""
    b, h, n, _ = q.shape
    extra = q.new_zeros(b, h, n, KEY_BIAS_DIMS)
    q_extra, k_extra = extra.clone(), k.new_zeros(b, h, k.shape[2], KEY_BIAS_DIMS)
    q_extra[..., 0] = 1
    k_extra[..., 0] = key_bias.to(k.dtype)
    v_extra = v.new_zeros(b, h, v.shape[2], KEY_BIAS_DIMS)
    return torch.cat([q, q_extra], -1), torch.cat([k, k_extra], -1), torch.cat([v, v_extra], -1)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup,
                   key_bias: Tensor | None = None) -> Tensor:
    """Full attention of my q chunk over every rank's K/V chunk: torch's ring loop, no load balancing
    (that is for causal masks; it would also reorder the sequence). `key_bias` [L_local]: my keys' bias
    (-inf: padded text, v1.2), carried through the ring in an extra head dimension."""
    cp = _ring_loop()
    op, kwargs = _kernel(q)
    dims = q.shape[-1]
    if key_bias is not None:
        q, k, v = with_key_bias(q, k, v, key_bias)
        kwargs = {**kwargs, "scale": dims**-0.5}
    balance = cp._cp_options.enable_load_balance
    cp._cp_options.enable_load_balance = False
    try:
        out, *_ = cp._templated_ring_attention(group, 2, op, q, k, v, is_causal=False, **kwargs)
    finally:
        cp._cp_options.enable_load_balance = balance
    return out[..., :dims]


class SequenceParallelAttention(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention(q, k, v)` on this rank's chunk to Ulysses, then ring; `counts`:
    each Ulysses rank's chunk length, where they differ; `key_bias`: my keys' bias for the ring (v1.2's padded
    text)."""

    def __init__(self, groups: ParallelGroups, counts: list[int] | None = None, key_bias: Tensor | None = None):
        super().__init__()
        self.groups, self.counts, self.key_bias = groups, counts, key_bias

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) != 3 or kwargs:
                raise NotImplementedError("sequence-parallel attention supports plain unmasked SDPA(q, k, v) only")
            return self.attention(*args)
        return func(*args, **kwargs)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        u, r = self.groups.degrees.ulysses, self.groups.degrees.ring
        if u > 1:
            group = self.groups.group("ulysses")
            q, k, v = (heads_to_sequence(t, group, u, self.counts) for t in (q, k, v))
        if r > 1:
            out = ring_attention(q, k, v, self.groups.group("ring"), self.key_bias)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if u > 1:
            out = sequence_to_heads(out, self.groups.group("ulysses"), u, self.counts)
        return out


@contextmanager
def sequence_parallel(groups: ParallelGroups, counts: list[int] | None = None, key_bias: Tensor | None = None):
    """Attention inside the block is sequence-parallel (a no-op layout when the sequence is not split)."""
    if groups.degrees.sequence == 1:
        yield
        return
    with SequenceParallelAttention(groups, counts, key_bias):
        yield
