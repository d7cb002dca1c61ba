"""When will an edit finish? Measured step times per batch size and the work queued ahead of it.

The batch runs `b` edits per DiT step, each step taking `step_s(b)`; every edit also costs a fixed
`overhead_s` outside the loop (preprocess, MLLM, VAE encode and decode), paid one edit at a time by the
worker. An edit arriving behind `work` steps of `edits` other edits, itself needing `steps`, is predicted
to finish after

    (edits + 1) * overhead_s + (work + steps) / b * step_s(b),   b = min(batch_limit, edits + 1)

and never sooner than its own `steps * step_s(b) + overhead_s` (with max_batch 1 this is the serial queue:
every edit ahead runs whole first). Both figures are running means of what the server measured; a batch
size not seen yet is estimated from the nearest smaller one as if batching gained nothing (`step_s` linear
in b), so the first guesses err towards refusing later, not sooner. `batch_limit` is the batch the server
runs: by default the measured size (up to max_batch) that gets the most steps done, so batching never costs
throughput.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.batching import EditOutcome

DEFAULT_STEP_S = 1.0  # before anything was measured (the warm-up edit measures it before /readyz says ready)
SMOOTHING = 0.2  # weight of the newest measurement in the running means


class Forecast:
    def __init__(self, max_batch: int, *, adaptive: bool = True):
        self.max_batch, self.adaptive = max_batch, adaptive
        self.step_s: dict[int, float] = {}  # batch size -> mean seconds per DiT step
        self.overhead_s = 0.0

    def observe(self, outcome: EditOutcome) -> None:
        """Fold a finished edit's step times (each with its batch size) and its other stages into the means."""
        # The DiT calls alone: the preparation and decoding between steps is the overhead's share.
        times = outcome.dit_seconds or outcome.step_seconds[1:]  # one at a time (no batching): its steps
        for seconds, batch in zip(times, outcome.batch_sizes[-len(times):], strict=False):
            old = self.step_s.get(batch)
            self.step_s[batch] = seconds if old is None else old + SMOOTHING * (seconds - old)
        other = sum(v for k, v in outcome.timings.items() if k != "denoise" and not k.startswith("load "))
        self.overhead_s = other if not self.overhead_s else self.overhead_s + SMOOTHING * (other - self.overhead_s)

    def batch_limit(self) -> int:
        """How many edits a batch takes. Adaptive: `max_batch` until a batch that size was measured (the
        warm-up runs one), then the measured size with the most edit-steps per second (the smaller on a tie).
        Batching pays where a step's fixed costs dominate (the toy model on this project's 2-core CPU: 6.1 ms a
        step alone, 4.6 ms per edit in a batch of 4); where the step is compute-bound a batch costs more per
        edit (the tiny model there: 38.8 ms alone, 45.9 ms per edit at 4) and only adds latency, so edits then
        run one at a time. Not adaptive: always `max_batch`."""
        measured = {b: s for b, s in self.step_s.items() if b <= self.max_batch and s > 0}
        if not self.adaptive or self.max_batch not in measured:
            return self.max_batch
        return max(measured, key=lambda b: (b / measured[b], -b))

    def step_time(self, batch: int) -> float:
        if batch in self.step_s:
            return self.step_s[batch]
        smaller = [b for b in self.step_s if b < batch]
        if smaller:
            b = max(smaller)
            return self.step_s[b] * batch / b
        larger = [b for b in self.step_s if b > batch]
        return self.step_s[min(larger)] if larger else DEFAULT_STEP_S * batch

    def completion_s(self, work: int, edits: int, steps: int) -> float:
        """Seconds until an edit of `steps` steps, behind `work` steps of `edits` edits, is finished."""
        b = max(1, min(self.batch_limit(), edits + 1))
        per_step = self.step_time(b)
        shared = (edits + 1) * self.overhead_s + (work + steps) / b * per_step
        return max(shared, steps * per_step + self.overhead_s)

    def retry_after_s(self, work: int, edits: int, steps: int) -> int:
        """The predicted wait before such an edit could start (at least 1 s): a client's sensible pause."""
        b = max(1, min(self.batch_limit(), edits + 1))
        own = steps * self.step_time(b) + self.overhead_s
        return max(1, math.ceil(self.completion_s(work, edits, steps) - own))
