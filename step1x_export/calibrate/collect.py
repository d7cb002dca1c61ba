"""Activation statistics of every Linear input over the reference pipeline's real sampling loop.

Forward pre-hooks on each `nn.Linear` keep a running per-input-channel amax (K floats per layer,
whatever the number of images, steps or tokens: bounded memory). Both CFG branches run in one
batch, so both are covered; every denoising step of every pair is seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..step1x_ref.pipeline import Step1XEditPipeline, torch_step_fn
from ..step1x_ref.sampling import denoise, guided_euler
from .dataset import CalibrationPair, load_pair_image


@dataclass
class InputStats:
    channel_amax: Tensor  # [K] float32: max |x| per input channel, over all tokens, steps and pairs
    calls: int = 0

    @property
    def amax(self) -> Tensor:
        """Per-tensor amax []."""
        return self.channel_amax.max()


@contextmanager
def input_hooks(modules: dict[str, nn.Module], hook_for: Callable[[str], Callable[..., None]]) -> Iterator[None]:
    """`hook_for(name)` as a forward pre-hook of each named module while inside; removed on the way out."""
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StatsCollector:
    """Hooks that record `InputStats` of the selected Linear layers while active (a context manager)."""

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = sorted(set(names or ()) - set(linears))
        if missing:
            raise ValueError(f"no nn.Linear named {missing[:5]} in {type(model).__name__}")
        self.modules = {n: linears[n] for n in (names if names is not None else linears)}
        self.stats: dict[str, InputStats] = {}

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach()
            # No finiteness test here: it would stall the GPU once per Linear call. NaN and inf survive
            # amax and torch.maximum, so `check_finite` finds them once, when collection ends.
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            s = self.stats.get(name)
            if s is None:
                self.stats[name] = InputStats(amax, 1)
            else:
                torch.maximum(s.channel_amax, amax, out=s.channel_amax)
                s.calls += 1

        return record

    @contextmanager
    def active(self) -> Iterator[StatsCollector]:
        with input_hooks(self.modules, self._hook):
            yield self
        self.check_finite()

    def check_finite(self) -> None:
        """Raise if any recorded input held inf/NaN values (naming the layers)."""
        bad = [n for n, s in self.stats.items() if not torch.isfinite(s.channel_amax).all()]
        if bad:
            raise ValueError(f"calibration: the input of {bad[:5]} ({len(bad)} layers) has inf/NaN values")


def run_pairs(pipe: Step1XEditPipeline, pairs: list[CalibrationPair], *, steps: int, size_level: int, cfg: float,
              seed: int, progress: bool) -> None:
    """The reference edit's sampling loop over `pairs` (true CFG, all steps), for hooks to watch; pair i uses
    noise seed `seed + i`."""
    if not pairs:
        raise ValueError("calibration needs at least one (image, instruction) pair")
    bar = tqdm(total=len(pairs) * steps, desc="calibrating", unit="step", disable=not progress)
    with torch.inference_mode():
        for i, pair in enumerate(pairs):
            bar.set_postfix_str(f"{pair.image}/{pair.task}/{pair.language}")
            inputs = pipe.prepare(load_pair_image(pair), pair.instruction, seed=seed + i, steps=steps,
                                  size_level=size_level)
            step = torch_step_fn(pipe.model, inputs, pipe.dtype)
            denoise(guided_euler(step), inputs.noise, inputs.ref, inputs.timesteps, guidance=cfg,
                    truncate=pipe.config.cfg_truncate, progress=lambda done, total: bar.update(1))
    bar.close()


def collect_stats(
    pipe: Step1XEditPipeline,
    pairs: list[CalibrationPair],
    *,
    steps: int,
    size_level: int,
    cfg: float = 6.0,
    seed: int = 0,
    names: list[str] | None = None,
    progress: bool = True,
) -> dict[str, InputStats]:
    """Run `prepare` + `denoise` (true CFG, all steps) over `pairs`, recording the inputs of `names`
    (default: every nn.Linear of the DiT + connector). Pair i uses noise seed `seed + i`."""
    collector = StatsCollector(pipe.model, names)
    with collector.active():
        run_pairs(pipe, pairs, steps=steps, size_level=size_level, cfg=cfg, seed=seed, progress=progress)
    unused = sorted(set(collector.modules) - set(collector.stats))
    if unused:
        raise ValueError(f"calibration never saw an input for {unused[:5]} ({len(unused)} layers)")
    return collector.stats
