"""Stage swapping: a stage's weights read from disk once into (pinned) host memory, copied to the device for
its turn on a side stream and dropped there after it; the host copy stays for the next turn.

What is ordered (the same code on every device; `streams.py` says what a queue is there):
1. `start`: the device copies are allocated and filled on the side stream (from pinned memory on CUDA: the
   copy runs beside the compute still queued, e.g. the previous stage's last kernels), a marker after them;
   the stage's parameters and buffers point at the copies from then on;
2. `arrive`: the compute stream waits for that marker before the stage runs, and each copy is marked as used
   by the compute stream, so its memory (the side stream's) is reused only after the compute work read it;
3. `leave`: the parameters and buffers point back at the host copy; the device copies are dropped (their
   memory goes back to the side stream's pool, for the next stage's copies).

A stage is any engine holding torch modules (`TorchEngine.module`, `TorchEncoder.embedder`); its weights are
its modules' parameters and buffers, each moved by reassigning its `.data`, so every holder of the module
(compiled blocks, the step cache) sees the same objects. Tensors on `meta` (shells, the unused VAE half) stay
as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .streams import Streams, device_streams


def engine_modules(engine: Any) -> list[nn.Module]:
    """The torch modules an engine runs (none for ONNX Runtime and TensorRT engines, which own their memory)."""
    return [value for value in vars(engine).values() if isinstance(value, nn.Module)]


def module_tensors(modules: list[nn.Module]) -> list[Tensor]:
    """Each parameter and buffer of `modules` once (tied and shared ones included once), `meta` ones left out."""
    seen: dict[int, Tensor] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type != "meta":
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def host_tensor(tensor: Tensor, pin: bool) -> Tensor:
    """`tensor` in host memory: the tensor itself if it is there (and pinned where asked), else one copy."""
    if tensor.device.type == "cpu" and (tensor.is_pinned() or not pin):
        return tensor.detach()
    return torch.empty_like(tensor, device="cpu", pin_memory=pin).copy_(tensor.detach())


@dataclass
class HostCopy:
    """One stage's weights in host memory and, during its turn, on the device."""

    tensors: list[Tensor]  # the modules' own parameter and buffer objects, repointed in turn
    host: list[Tensor]
    device_copies: list[Tensor] = field(default_factory=list)
    ready: Any = None  # the side-stream marker after the device copies

    @classmethod
    def of(cls, engine: Any, pin: bool) -> HostCopy:
        """The engine's weights copied to the host now (pinned for an asynchronous copy back to a GPU); a
        tensor already on the host is kept as it is (no second host copy on a CPU device)."""
        tensors = module_tensors(engine_modules(engine))
        return cls(tensors, [host_tensor(t, pin) for t in tensors])

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.device_copies)

    def start(self, streams: Streams, device: torch.device) -> None:
        """Queue the copy to the device on the side stream."""
        with streams.on(streams.side):
            self.device_copies = [torch.empty_like(h, device=device) for h in self.host]
            for dst, src in zip(self.device_copies, self.host, strict=True):
                streams.copy(dst, src)
            self.ready = streams.side.record_event()
        for tensor, copy in zip(self.tensors, self.device_copies, strict=True):
            tensor.data = copy

    def arrive(self, streams: Streams) -> None:
        """Order the stage's compute after its copy (started now if it was not)."""
        streams.compute.wait_event(self.ready)
        for copy in self.device_copies:
            streams.hand_over(copy, streams.compute)

    def leave(self) -> None:
        """Point the weights back at the host copy; the device copies are freed once the compute has read them."""
        for tensor, host in zip(self.tensors, self.host, strict=True):
            tensor.data = host
        self.device_copies, self.ready = [], None


class HostSwap:
    """The swapped stages of one runtime: their host copies and which one is on the device or on its way."""

    def __init__(self, device: torch.device, streams: Streams | None = None):
        self.device = device
        self.streams = streams if streams is not None else device_streams(device)
        self.copies: dict[str, HostCopy] = {}
        self.on_device: set[str] = set()  # copied (or being copied) to the device

    def holds(self, engine: Any) -> bool:
        """Whether `engine` can be swapped (it runs torch modules)."""
        return bool(engine_modules(engine))

    def park(self, name: str, engine: Any) -> None:
        """`name`'s turn is over: its weights to the host (copied there on its first turn), the device's dropped."""
        if name not in self.copies:
            self.copies[name] = HostCopy.of(engine, pin=self.device.type == "cuda")
        self.copies[name].leave()
        self.on_device.discard(name)

    def start(self, name: str) -> None:
        """Begin copying `name`'s weights to the device (a no-op if they are there or on their way)."""
        if name not in self.on_device:
            self.copies[name].start(self.streams, self.device)
            self.on_device.add(name)

    def arrive(self, name: str) -> None:
        """`name`'s weights on the device, ordered before its compute."""
        self.start(name)
        self.copies[name].arrive(self.streams)

    def device_bytes(self) -> int:
        """Bytes of stage weights this swap holds on the device now."""
        return sum(self.copies[name].device_bytes for name in self.on_device)
