"""Which SDPA kernel the DiT's attention runs on (`RuntimeOptions.attention`), set around the denoising step.

Attention is about a third of a 1024^2 step's FLOPs. Plain SDPA picks FlashAttention-2 on Hopper, where
cuDNN's attention is reported 1.7-2.3x faster; `benchmarks/first_light.sh` measures every choice on the GPU
it runs on. The choice is a `torch.nn.attention.sdpa_kernel` context entered around the whole step, so it
holds while the step is traced by torch.compile, warmed up and captured in a CUDA graph: the kernel is
chosen inside the captured graph, not per replay.

torch.compile traces the blocks under the context in force at their first call (the runtime's first edit), so
a process keeps the kernel of the first runtime that compiled them; runtimes with different choices in one
process share the compiled blocks (the benchmark compares kernels on eager blocks for that reason).

  auto       cuDNN first on compute capability >= 9.0 (Hopper and newer), then flash, memory-efficient,
             math; elsewhere torch's own order
  flash / cudnn / efficient / math   only that kernel (an input it cannot take raises, naming the kernel)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_ONLY = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
HOPPER_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
CUDNN_FIRST_CAPABILITY = (9, 0)


def attention_context(choice: str, device: torch.device) -> AbstractContextManager[Any]:
    """The `sdpa_kernel` context for `choice` on `device` (no context: torch's default order)."""
    if choice in _ONLY:
        return sdpa_kernel(_ONLY[choice])
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= CUDNN_FIRST_CAPABILITY:
        return sdpa_kernel(HOPPER_ORDER, set_priority=True)
    return nullcontext()


def with_attention(fn: Callable[..., Any], choice: str, device: torch.device) -> Callable[..., Any]:
    """`fn` run inside `choice`'s attention context (a plain pass-through for torch's default order)."""
    if choice == "auto" and not (device.type == "cuda" and torch.cuda.get_device_capability(device)
                                 >= CUDNN_FIRST_CAPABILITY):
        return fn

    def run(*args: Any) -> Any:
        with attention_context(choice, device):
            return fn(*args)

    return run
