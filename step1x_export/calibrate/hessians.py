"""Input statistics for GPTQ (`int4.gptq_int4`): H = sum x x^T over every row each selected Linear sees in the
reference sampling loop, as calibration runs it.

On the toy model (96 wide), every block Linear in 4 bits: the DiT's per-step SQNR on a reference edit's inputs
goes from 14.6 dB (nearest rounding, range search) to 25.0 dB with H from those same inputs. H is K x K float32
per layer; `collect_hessians` holds every selected layer's at once, which fits the small models; the 12B DiT's
(K up to 15,360: 0.9 GiB for one layer) would be collected and used a block at a time (not built).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .collect import input_hooks, run_pairs


class HessianCollector:
    """Forward pre-hooks summing x^T x over every row each named Linear sees, while `active`."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.modules = {n: model.get_submodule(n) for n in names}
        self.hessians: dict[str, Tensor] = {}

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            h = self.hessians.get(name)
            if h is None:
                self.hessians[name] = x.t() @ x
            else:
                h.addmm_(x.t(), x)

        return record

    @contextmanager
    def active(self) -> Iterator[HessianCollector]:
        with input_hooks(self.modules, self._hook):
            yield self


def collect_hessians(pipe, pairs, names: list[str], *, steps: int, size_level: int, cfg: float, seed: int = 0,
                     progress: bool = False) -> dict[str, Tensor]:
    """H per named Linear of `pipe.model` over the reference sampling loop of `pairs` (as calibration runs it)."""
    collector = HessianCollector(pipe.model, names)
    with collector.active():
        run_pairs(pipe, pairs, steps=steps, size_level=size_level, cfg=cfg, seed=seed, progress=progress)
    return collector.hessians
