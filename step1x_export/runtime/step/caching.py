"""Step caching: on steps where the DiT's input barely moved, reuse the blocks' last residual instead of running them.

Two policies, each one decision for the whole CFG batch (cond and uncond are computed or reused together):

- **TeaCache**, upstream's rule exactly: the signal is `double_blocks[0].img_norm1(img_in(img))` over the
  whole batch and every image token (LayerNorm without affine or modulation, so it does not depend on t);
  rel = mean|cur - prev| / mean|prev|; the accumulator grows by p(rel) (upstream's fitted quartic) and the
  blocks are skipped while it stays below the threshold, else computed and the accumulator reset; the first
  and the last step always compute; `prev` follows every step. Skipping adds the cached residual
  (blocks' image-token output minus `img_in`'s) to this step's `img_in` output; the final layer always runs
  with this step's `vec`.
- **First-Block Cache** (ParaAttention's rule): the first double block always runs; if its image-token
  residual moved by less than the threshold (relative mean absolute change) since the last computed step,
  the other blocks are skipped and their cached residual is added to the first block's output.

v1.2's branches hold different texts: its signal is the rule's, computed on the conditional branch's rows
only; on a skipped step each DiT call (one per branch, or the one masked call of both) reuses its own residual.

The decision is made on the device (the accumulator is a float64 device scalar) and read once per step
(`.item()` of one bool); in a parallel run the statistics are summed over the ranks and rank 0's
decision is broadcast. Each piece (prepare + probe, the remaining blocks, the final layer) is its own
CUDA graph when graphs are on, so a skipped step replays the small graphs only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...step1x_ref.versions.v1p2_joint import KeyPaddingMask, key_mask
from .cache_spec import CacheSpec
from .cudagraph import DEFAULT_GRAPH_CACHE, CudaGraphed, GraphCounts
from .split_dit import Hidden, SplitDiT, split_dit

# Upstream's rescaling polynomial of rel (highest power first), fitted by the TeaCache authors for this model.
TEACACHE_POLY = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


@dataclass
class CacheStats:
    """DiT calls of the last edit whose blocks ran (computed) or were replaced by the cached residual (reused)."""

    computed: int = 0
    reused: int = 0
    decisions: list[bool] = field(default_factory=list)  # per step: True = computed

    def record(self, compute: bool) -> None:
        self.decisions.append(compute)
        if compute:
            self.computed += 1
        else:
            self.reused += 1

    def __str__(self) -> str:
        return f"DiT calls: {self.computed} computed, {self.reused} reused"


def teacache_poly(rel: Tensor) -> Tensor:
    """p(rel) by Horner's rule in float64, the order numpy's poly1d evaluates it in."""
    x, y = rel.double(), torch.zeros((), dtype=torch.float64, device=rel.device)
    for c in TEACACHE_POLY:
        y = y * x + c
    return y


def relative_change(dit: SplitDiT, cur: Tensor, prev: Tensor) -> Tensor:
    """mean|cur - prev| / mean|prev| over the whole batch (every rank's shard: equal shards, so means add up)."""
    means = torch.stack([(cur - prev).abs().mean(), prev.abs().mean()]).float()
    total = dit.total(means)
    return total[0] / total[1]


class TeaCacheRule:
    """Upstream's accumulate-and-reset rule; state is rank 0's (broadcast), so every rank decides alike."""

    start = 0  # the cached span: every block

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.prev: Tensor | None = None
        self.acc: Tensor | None = None

    def probe(self, dit: SplitDiT, h: Hidden) -> tuple[Hidden, Tensor]:
        # In float32 whatever the compute dtype: upstream runs under autocast, which does LayerNorm in float32.
        return h, dit.model.double_blocks[0].img_norm1(h.img.float())

    def decide(self, dit: SplitDiT, step: int, num_steps: int, signal: Tensor) -> bool:
        prev, self.prev = self.prev, signal
        if step == 0 or step == num_steps - 1 or prev is None:
            self.acc = torch.zeros((), dtype=torch.float64, device=signal.device)
            return True
        assert self.acc is not None
        acc = self.acc + teacache_poly(relative_change(dit, signal, prev))
        compute = acc >= self.threshold
        state = dit.from_leader(torch.stack([compute.double(), acc]))
        compute_now = bool(state[0].item())  # the step's one device-to-host read
        self.acc = torch.zeros_like(acc) if compute_now else state[1]
        return compute_now


class FirstBlockRule:
    """Skip the blocks after the first while the first block's residual stays within the threshold."""

    start = 1  # the cached span: every block after the first double block

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.prev: Tensor | None = None

    def probe(self, dit: SplitDiT, h: Hidden) -> tuple[Hidden, Tensor]:
        first = dit.first_block(h)
        return first, first.img - h.img

    def decide(self, dit: SplitDiT, step: int, num_steps: int, signal: Tensor) -> bool:
        if step == 0 or self.prev is None:
            compute = True
        else:
            rel = dit.from_leader(relative_change(dit, signal, self.prev))
            compute = bool(rel.item() >= self.threshold)
        if compute:  # the reference residual is the last computed step's (reuse does not move it)
            self.prev = signal
        return compute


RULES = {"teacache": TeaCacheRule, "fbcache": FirstBlockRule}


class CachedStep:
    """A denoising step function (for `guided_euler`) over a torch DiT engine, with step caching.

    `begin(num_steps)` starts an edit (resets the rule and the counters); each call is one step. The step's
    conditioning is the version's: `branches` = 2 for v1.2's one DiT call per CFG branch (the cond inputs, then
    the uncond), each call with its own cached residual; `masked` for v1.2's one padded call (the padded text
    keys masked in every attention); `cond_signal` decides on the conditional branch's rows only (v1.2, whose
    branches hold different texts), as upstream's rule computes it on the whole batch for v1.0 / v1.1.
    """

    def __init__(self, engine, spec: CacheSpec, *, cuda_graphs: bool = False, capacity: int = DEFAULT_GRAPH_CACHE,
                 counts: GraphCounts | None = None, branches: int = 1, masked: bool = False,
                 cond_signal: bool = False):
        self.engine, self.spec = engine, spec
        self.branches, self.masked, self.cond_signal = branches, masked, cond_signal
        self.conditioning = [n for n in engine.spec.input_names if n not in ("img", "timestep")]
        self.dit = split_dit(engine.module)
        self.rule = RULES[spec.policy](spec.threshold)
        self.stats = CacheStats()
        self.step, self.num_steps = 0, 0
        self.residuals: list[Tensor] | None = None
        graphs = dict(enabled=cuda_graphs, capacity=capacity, counts=counts)
        self._head = CudaGraphed(self._head_fn, **graphs)
        self._rest = CudaGraphed(self._rest_fn, **graphs)
        self._finish = CudaGraphed(self.dit.finish, **graphs)

    def begin(self, num_steps: int) -> None:
        self.rule = RULES[self.spec.policy](self.spec.threshold)
        self.stats, self.step, self.num_steps, self.residuals = CacheStats(), 0, num_steps, None

    def _keys(self, keys: tuple[Tensor, ...]) -> AbstractContextManager[object]:
        return KeyPaddingMask(keys[0]) if keys else nullcontext()

    def _head_fn(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        # The key mask is computed here, from the static llm_mask, so a captured graph reads each edit's own.
        keys = (key_mask(inputs[4], inputs[0].shape[1]),) if self.masked else ()
        with self._keys(keys):
            base, signal = self.rule.probe(self.dit, self.dit.prepare(*inputs))
        return (*base.as_tuple(), signal, *keys)

    def _rest_fn(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, *keys: Tensor) -> Tensor:
        with self._keys(keys):
            return self.dit.rest(Hidden(img, txt, vec, pe), self.rule.start)

    def _calls(self, img: Tensor, t: Tensor, conditioning: tuple[Tensor, ...]) -> list[list[Tensor]]:
        """Each DiT call's inputs in the dit spec's order, cast as the torch engine casts them."""
        engine, rows = self.engine, img.shape[0] // self.branches
        per = len(conditioning) // self.branches
        calls = []
        for b in range(self.branches):
            inputs = dict(zip(self.conditioning, conditioning[b * per : (b + 1) * per], strict=True),
                          img=img[b * rows : (b + 1) * rows], timestep=t[b * rows : (b + 1) * rows])
            calls.append([inputs[s.name].to(engine.device, s.torch_dtype(engine.dtype)) for s in engine.spec.inputs])
        return calls

    def __call__(self, img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        with torch.inference_mode():
            heads = [self._head(*call) for call in self._calls(img, t, conditioning)]
            signal = heads[0][4][:1] if self.cond_signal else heads[0][4]
            compute = self.rule.decide(self.dit, self.step, self.num_steps, signal) or self.residuals is None
            residuals, preds = [], []
            for i, (img_h, txt, vec, pe, _, *keys) in enumerate(heads):
                if compute:
                    out = self._rest(img_h, txt, vec, pe, *keys)
                    residuals.append(out - img_h)
                else:
                    out = img_h + self.residuals[i]
                preds.append(self._finish(out, vec))
            if compute:
                self.residuals = residuals
        self.stats.record(compute)
        self.step += 1
        return (preds[0] if len(preds) == 1 else torch.cat(preds)).float()
