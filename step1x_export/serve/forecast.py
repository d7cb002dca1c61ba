"""When will an edit finish? Measured step times per batch size and the work queued ahead of it.

The batch runs `b` edits per DiT step, each step taking `step_s(b)`. Outside the loop every edit costs
`overhead_s` of its own (preprocess, MLLM, VAE encode, postprocess: the worker runs them one edit at a time),
and the edits that leave the batch at the same step share one VAE decode of `shared_s`, `sharing` edits per
call on average. An edit arriving behind `work` steps of `edits` other edits, itself needing `steps`, is
predicted to finish after

    edits * (overhead_s + shared_s / sharing) + overhead_s + shared_s + (work + steps) / b * step_s(b),
    b = min(max_batch, edits + 1)

(the edits ahead pay their share of each shared call, this edit waits for its own call whole), and never
sooner than its own `steps * step_s(b) + overhead_s + shared_s`. With max_batch 1 nothing is shared and this
is the serial queue: every edit ahead runs whole first. All figures are running means of what the server
measured; a batch size not seen yet is estimated from the nearest smaller one as if batching gained nothing
(`step_s` linear in b), so the first guesses err towards refusing later, not sooner.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..runtime.batching import EditOutcome

DEFAULT_STEP_S = 1.0  # before anything was measured (the warm-up edit measures it before /readyz says ready)
SMOOTHING = 0.2  # weight of the newest measurement in the running means
SHARED_STAGES = ("vae_decode",)  # one call for the edits that leave the batch together


class Forecast:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.step_s: dict[int, float] = {}  # batch size -> mean seconds per DiT step
        self.overhead_s = 0.0  # an edit's own stages outside the loop
        self.shared_s = 0.0  # a call serving the edits that leave together (the VAE decode), whole
        self.sharing = 1.0  # edits per such call

    def observe(self, outcome: EditOutcome) -> None:
        """Fold a finished edit's step times (each with its batch size) and its other stages into the means."""
        # The DiT calls alone: the preparation and decoding between steps is the overhead's share.
        times = outcome.dit_seconds or outcome.step_seconds[1:]  # one at a time (no batching): its steps
        for seconds, batch in zip(times, outcome.batch_sizes[-len(times):], strict=False):
            old = self.step_s.get(batch)
            self.step_s[batch] = seconds if old is None else old + SMOOTHING * (seconds - old)
        stages = {k: v for k, v in outcome.timings.items() if k != "denoise" and not k.startswith("load ")}
        own = sum(v for k, v in stages.items() if k not in SHARED_STAGES)
        self.overhead_s = own if not self.overhead_s else self.overhead_s + SMOOTHING * (own - self.overhead_s)
        calls = [k for k in SHARED_STAGES if k in stages]  # an edit decoded alone had a call of its own: 1 edit
        if calls:
            call_s, edits = sum(stages[k] for k in calls), max(outcome.shared.get(k, 1) for k in calls)
            self.shared_s = call_s if not self.shared_s else self.shared_s + SMOOTHING * (call_s - self.shared_s)
            self.sharing += SMOOTHING * (edits - self.sharing)

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
        b = max(1, min(self.max_batch, edits + 1))
        per_step = self.step_time(b)
        own = self.overhead_s + self.shared_s
        queued = edits * (self.overhead_s + self.shared_s / self.sharing) + own + (work + steps) / b * per_step
        return max(queued, steps * per_step + own)

    def retry_after_s(self, work: int, edits: int, steps: int) -> int:
        """The predicted wait before such an edit could start (at least 1 s): a client's sensible pause."""
        b = max(1, min(self.max_batch, edits + 1))
        own = steps * self.step_time(b) + self.overhead_s + self.shared_s
        return max(1, math.ceil(self.completion_s(work, edits, steps) - own))
