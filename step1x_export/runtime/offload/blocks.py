"""DiT block streaming: the transformer blocks live in (pinned) host memory and each one is copied to the
device a few blocks ahead of its turn, on a side stream, then freed once it has run.

What is ordered, per streamed block (`BlockStreamer.fetch` and `run`):
1. its device memory is allocated on the compute stream, and a marker is recorded there: memory the
   allocator hands back may have been freed by compute work still queued, so the side stream waits for the
   marker before it writes (no copy overwrites weights a queued GEMM still reads);
2. the copy runs on the side stream, and a marker after it is recorded;
3. the compute stream waits for that marker before the block runs (no read before the copy lands);
4. the block runs over its device tensors, which are then dropped: freed on the compute stream, in its order,
   after the work that reads them.
The blocks are prefetched in the order they run and wrap around: the last block of a step prefetches the
first streamed blocks of the next DiT call, so a step starts with its first copies already made.

Nothing of the reference model is changed: each streamed block runs as a shell (the block's structure, its
tensors on `meta` between uses) that the streamer owns and fills with the device copies for its turn; the
streamed DiT is a new `Step1XEdit` object sharing the model's other modules, its block lists holding
`StreamedBlock`s, so the model's own forward (and step caching's pieces) run over it unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..engines.compile import BLOCK_LISTS
from .streams import Streams, device_streams


@dataclass
class Fetch:
    """A block's device tensors and the side-stream marker after which they hold its weights."""

    tensors: dict[str, Tensor]
    ready: Any


def host_state(block: nn.Module, pin: bool) -> dict[str, Tensor]:
    """The block's parameters and buffers on the host: pinned copies for a CUDA device (so copies run
    asynchronously), else the block's own tensors (read, never written)."""
    state = {k: t.detach().to("cpu") for k, t in block.state_dict().items()}
    return {k: t.pin_memory() for k, t in state.items()} if pin else state


def meta_shell(block: nn.Module) -> nn.Module:
    """A copy of `block`'s structure whose parameters and buffers are empty `meta` tensors."""
    memo: dict[int, Any] = {}
    for p in block.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in block.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(block, memo)


def _settle(shell: nn.Module) -> None:
    """Layers that derive state from their tensors' device (8-bit GEMM choice) derive it again."""
    for m in shell.modules():
        choose = getattr(m, "choose_kernel", None)
        if callable(choose):
            choose()


class BlockStreamer:
    """Runs streamed blocks by position (the order they run in), `ahead` copies in flight beyond the current one."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, *, ahead: int, streams: Streams):
        if ahead < 1:
            raise ValueError(f"blocks streamed ahead must be >= 1, got {ahead}")
        self.device, self.ahead, self.streams = device, ahead, streams
        self.host = [host_state(b, pin=device.type == "cuda") for b in blocks]
        self.shells = [meta_shell(b) for b in blocks]
        self.empty = [{k: torch.empty_like(t, device="meta") for k, t in s.state_dict().items()} for s in self.shells]
        self.pending: dict[int, Fetch] = {}
        self.copies = 0  # blocks copied to the device so far (the bytes moved are counted by the plan)

    def __len__(self) -> int:
        return len(self.host)

    def fetch(self, position: int) -> None:
        """Queue the copy of the block at `position` unless it is already on its way."""
        if position in self.pending:
            return
        s = self.streams
        allocated = s.compute.record_event()
        tensors = {k: torch.empty_like(h, device=self.device) for k, h in self.host[position].items()}
        s.side.wait_event(allocated)
        with s.on(s.side):
            for k, h in self.host[position].items():
                s.copy(tensors[k], h)
            ready = s.side.record_event()
        self.pending[position] = Fetch(tensors, ready)
        self.copies += 1

    def window(self, position: int) -> list[int]:
        """The block at `position` and the ones prefetched behind it, wrapping into the next DiT call."""
        return list(dict.fromkeys((position + d) % len(self) for d in range(self.ahead + 1)))

    def run(self, position: int, *args: Any, **kwargs: Any) -> Any:
        window = self.window(position)
        for stale in [p for p in self.pending if p not in window]:  # a block the last call skipped
            self.drop(stale)
        for p in window:
            self.fetch(p)
        fetched = self.pending.pop(position)
        self.streams.compute.wait_event(fetched.ready)
        shell = self.shells[position]
        shell.load_state_dict(fetched.tensors, strict=True, assign=True)
        _settle(shell)
        del fetched
        try:
            return shell(*args, **kwargs)
        finally:  # the shell lets go of the device tensors: freed behind the compute queued above
            shell.load_state_dict(self.empty[position], strict=True, assign=True)

    def drop(self, position: int) -> None:
        """Free a prefetched block unused: compute waits for its copy first, so the allocator hands its memory
        out again only after the side stream has finished writing it."""
        fetched = self.pending.pop(position, None)
        if fetched is not None:
            self.streams.compute.wait_event(fetched.ready)

    def close(self) -> None:
        for p in list(self.pending):
            self.drop(p)


class StreamedBlock(nn.Module):
    """A transformer block whose weights the streamer brings in for each call.

    Its shell is a registered child, so module walks (the lanes' Linears, `requires_grad_`) see its layers, and
    other attributes are the shell's (step caching reads the first block's parameterless `img_norm1`; a weight
    read outside a call is on `meta` and fails loudly). Moving the DiT (`.to(device)`) leaves it alone: its
    tensors live in the streamer's host memory.
    """

    def __init__(self, streamer: BlockStreamer, position: int):
        super().__init__()
        self.block = streamer.shells[position]
        self.position = position
        self._streamer = streamer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._streamer.run(self.position, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def extra_repr(self) -> str:
        return f"streamed from host memory, position {self.position} of {len(self._streamer)}"


def streamed_blocks(model: nn.Module) -> BlockStreamer | None:
    """The streamer behind a streamed DiT (None for a resident one)."""
    for m in model.modules():
        if isinstance(m, StreamedBlock):
            return m._streamer
    return None


def streamed_dit(model: nn.Module, device: torch.device | str, *, resident: int, ahead: int,
                 streams: Streams | None = None) -> nn.Module:
    """`model` (a torch DiT) with its transformer blocks after the first `resident` (double blocks first, then
    the single ones, as they run) streamed from host memory, `ahead` blocks prefetched; the other modules are
    `model`'s own (moved with the engine). `model` itself is not changed."""
    device = torch.device(device)
    lists = {name: list(getattr(model, name)) for name in BLOCK_LISTS}
    blocks = [b for name in BLOCK_LISTS for b in lists[name]]
    if isinstance(resident, bool) or not 0 <= resident <= len(blocks):
        raise ValueError(f"resident blocks must be in [0, {len(blocks)}] (the DiT's blocks), got {resident!r}")
    streamer = BlockStreamer(blocks[resident:], device, ahead=ahead, streams=streams or device_streams(device))
    proxies = {id(b): StreamedBlock(streamer, p) for p, b in enumerate(blocks[resident:])}
    shell = copy.copy(model)  # a new module object: its own registries, the same children
    for key, value in vars(model).items():
        if isinstance(value, dict):
            shell.__dict__[key] = type(value)(value)
    for name in BLOCK_LISTS:
        shell._modules[name] = nn.ModuleList(proxies.get(id(b), b) for b in lists[name])
    return shell
