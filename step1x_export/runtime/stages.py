"""Stages of an edit, loaded once and kept, or (sequential_load) loaded for their turn and freed after.

Sequential loading trades load time per edit for peak memory: the MLLM (~16 GB in bf16) is gone
before the DiT (~24 GB) arrives, which is what lets a 24 GB card run the full model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .telemetry.memory import release_cached

Loader = Callable[[], Any]  # builds an engine (anything with `close()`)
STAGE_ORDER = ("encoder", "vae_encoder", "dit", "vae_decoder")


class Stages:
    def __init__(self, loaders: dict[str, Loader], device: torch.device, *, sequential: bool):
        missing = set(STAGE_ORDER) - loaders.keys()
        if missing:
            raise ValueError(f"no loader for stage(s) {sorted(missing)}")
        self.loaders, self.device, self.sequential = loaders, device, sequential
        self.resident: dict[str, Any] = {}
        self.loads: dict[str, int] = dict.fromkeys(loaders, 0)  # how often each stage was built
        if not sequential:
            for name in STAGE_ORDER:
                self.load(name)

    def load(self, name: str) -> Any:
        """The stage's engine, built now if it is not resident."""
        if name not in self.resident:
            self.resident[name] = self.loaders[name]()
            self.loads[name] += 1
        return self.resident[name]

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """The stage's engine for the duration of the block; freed after it when sequential."""
        engine = self.load(name)
        try:
            yield engine
        finally:
            if self.sequential:
                self.free(name)

    def free(self, name: str) -> None:
        engine = self.resident.pop(name, None)
        if engine is not None:
            engine.close()
            release_cached(self.device)

    def close(self) -> None:
        for name in list(self.resident):
            self.free(name)
