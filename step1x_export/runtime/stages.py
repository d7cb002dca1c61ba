"""Stages of an edit, loaded once and kept, or (sequential_load) one on the device at a time.

Sequential loading trades time per edit for peak memory: the MLLM (~16 GB in bf16) is gone before the DiT
(~24 GB) arrives, which is what lets a 24 GB card run the full model. Where a stage waits between its turns:
- `True` (from disk): it is built from its files for its turn and freed after, every edit;
- `"host"`: it is built once, and after its first turn its weights wait in (pinned) host memory, copied to the
  device for each turn (`offload/swap.py`); when a stage's turn ends the next stage's copy starts, beside the
  work still queued. Engines without torch modules (ONNX Runtime, TensorRT) are rebuilt from their files as
  with `True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .offload.swap import HostSwap
from .options import SequentialLoad, check_sequential_load
from .telemetry.memory import release_cached

Loader = Callable[[], Any]  # builds an engine (anything with `close()`)
STAGE_ORDER = ("encoder", "vae_encoder", "dit", "vae_decoder")


class Stages:
    def __init__(self, loaders: dict[str, Loader], device: torch.device, *, sequential: SequentialLoad):
        missing = set(STAGE_ORDER) - loaders.keys()
        if missing:
            raise ValueError(f"no loader for stage(s) {sorted(missing)}")
        check_sequential_load(sequential)
        self.loaders, self.device, self.sequential = loaders, device, bool(sequential)
        self.swap = HostSwap(device) if sequential == "host" else None
        self.resident: dict[str, Any] = {}  # on the device
        self.parked: dict[str, Any] = {}  # swapped out: the weights in host memory
        self.loads: dict[str, int] = dict.fromkeys(loaders, 0)  # how often each stage was built
        if not sequential:
            for name in STAGE_ORDER:
                self.load(name)

    def load(self, name: str) -> Any:
        """The stage's engine on the device: built now, or its parked weights copied back."""
        if name not in self.resident:
            if name in self.parked:
                self._drop_prefetched(keep=name)
                assert self.swap is not None
                self.swap.arrive(name)
                self.resident[name] = self.parked.pop(name)
            else:
                self.resident[name] = self.loaders[name]()
                self.loads[name] += 1
        return self.resident[name]

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """The stage's engine for the duration of the block; off the device after it when sequential."""
        engine = self.load(name)
        try:
            yield engine
        finally:
            if self.sequential:
                self.release(name)

    def release(self, name: str) -> None:
        """`name`'s turn is over: parked in host memory (the next stage's copy started) or freed."""
        engine = self.resident.get(name)
        if self.swap is None or engine is None or not self.swap.holds(engine):
            self.free(name)
            return
        self.swap.park(name, engine)  # first, so a failed host copy leaves the stage resident, not lost
        self.parked[name] = self.resident.pop(name)
        later = STAGE_ORDER[STAGE_ORDER.index(name) + 1:]
        if later and later[0] in self.parked:  # what an edit runs next, copied while this stage's work finishes
            self.swap.start(later[0])

    def _drop_prefetched(self, keep: str) -> None:
        """A stage copied ahead that is not the one asked for (text-to-image skips the VAE encoder) goes back."""
        assert self.swap is not None
        for other in (self.swap.on_device & self.parked.keys()) - {keep}:
            self.swap.park(other, self.parked[other])

    def free(self, name: str) -> None:
        engine = self.resident.pop(name) if name in self.resident else self.parked.pop(name, None)
        if engine is not None:
            engine.close()
            release_cached(self.device)
        if self.swap is not None:
            self.swap.copies.pop(name, None)
            self.swap.on_device.discard(name)

    def close(self) -> None:
        for name in [*self.resident, *self.parked]:
            self.free(name)
