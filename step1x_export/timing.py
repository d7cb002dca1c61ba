"""Per-stage timing: CUDA events on a GPU (no sync inside the stage), the host clock on CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates seconds per named stage; `table()` renders them in order of first use."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[str, object, object]] = []
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
            self.seconds.setdefault(name, 0.0)
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def resolve(self) -> dict[str, float]:
        """Synchronise once and fold the CUDA events into seconds."""
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self.seconds[name] += start.elapsed_time(end) / 1000  # type: ignore[attr-defined]
            self._pending.clear()
        return dict(self.seconds)

    def table(self, title: str = "stage") -> str:
        seconds = self.resolve()
        width = max([len(title), *map(len, seconds)])
        lines = [f"{title:<{width}}  seconds", f"{'-' * width}  -------"]
        lines += [f"{name:<{width}}  {s:7.3f}" for name, s in seconds.items()]
        lines.append(f"{'total':<{width}}  {sum(seconds.values()):7.3f}")
        return "\n".join(lines)
