"""RegionE as the denoising loop's whole-step update: full steps (the plain edit's update), full steps that cache
keys and values (and make the partition), region steps on the edited tokens only, and reused steps (`region`
decides which).

The loop (`sampling.denoise_lanes`) is unchanged: every step it hands the whole latent in and takes the whole
latent back. The unedited tokens sit in it at the time they jumped to until the next full step needs them,
so a step of the region phase reads and writes the edited rows only. Its other steps combine CFG and take the
Euler step as `guided_euler` does, keeping the velocity for the partition, the jumps and the reuse.

The DiT runs over the reference model's modules block by block (the connector and embedders, each block
inside a `KVWindow`, the final layer): a region call's tokens are the text and the edited noisy
tokens; the reference tokens are never queried again, only attended to through the cache (unless `ref_kv` is
off: then every region call queries them too). v1.2 runs its
two CFG branches as two calls (the version's `step`), each with its own cache, as RegionE's v1.2 pipeline does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...step1x_ref.dit.model import Step1XEdit
from ...step1x_ref.sampling import Lane, StepFn, UpdateFn, cfg_combine
from ...validate import InputError
from ..engines.engine import Engine
from .region import CAPTURE, FULL, REGION, REUSE, RegionPlan, RegionStats, edited_tokens, gamma_for, region_plan
from .region_kv import KVWindow
from .region_spec import REGION_STEPS, RegionParams

KV = list[tuple[Tensor, Tensor]]  # per block (double blocks, then single blocks): keys, values [B, H, L, D]


def _dynamic(*tensors: Tensor) -> None:
    """Their token dimension may change between calls: one compiled graph serves every count."""
    for tensor, dim in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


class RegionDiT:
    """A DiT step function (one call per CFG batch, or per branch for v1.2) that records every block's keys and
    values (a full step) or runs the text and the edited tokens against them (a region step)."""

    def __init__(self, engine: Engine, names: tuple[str, ...]):
        module = getattr(engine, "module", None)
        if not isinstance(module, Step1XEdit):
            raise ValueError(f"cache regione needs the torch DiT in one process (Step1XEdit), "
                             f"got {type(module).__name__}")
        self.engine, self.model, self.names = engine, module, names
        self.caches: list[KV] = []  # per call of a step
        self.queried: Tensor | None = None  # a region call's image tokens (noisy rows, then reference rows)
        self.region, self._call = False, 0
        # per (call, region): the pe and queried tokens it was made for -> positions, RoPE rows
        self._positions: dict[tuple[int, bool], tuple[Tensor, Tensor | None, Tensor, Tensor]] = {}

    def start(self, *, region: bool) -> None:
        """The next step's calls record (full step) or run on the edited tokens against the records."""
        self.region, self._call = region, 0
        if not region:
            self.caches = []

    def release(self) -> None:
        """Drop the recorded keys and values: every block's, per CFG call, for the text, noisy and reference
        tokens (12.4 GB at 1024 x 1024 in bf16), which a server would otherwise hold between edits."""
        self.caches, self.queried = [], None
        self._positions.clear()

    def __call__(self, img: Tensor, t: Tensor, *conditioning: Tensor) -> Tensor:
        engine = self.engine
        given = dict(img=img, timestep=t, **dict(zip(self.names, conditioning, strict=True)))
        inputs = {s.name: given[s.name].to(engine.device, s.torch_dtype(engine.dtype)) for s in engine.spec.inputs}
        call, self._call = self._call, self._call + 1
        with torch.inference_mode():
            if not self.region:  # a new cache, recorded at every position
                self.caches.append(self._new_cache(inputs["img"], inputs["llm_embedding"].shape[1]))
            rows, pe = self._rows(call, inputs)
            windows = [KVWindow.of(pe, k, v, rows) for k, v in self.caches[call]]
            return self._blocks(inputs, windows).float()

    def _rows(self, call: int, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The call's positions in the full sequence (a region call: the text, then the queried image tokens)
        and their RoPE rows: made once per partition and call, reused while its inputs are the same tensors."""
        pe, queried = inputs["pe"], self.queried if self.region else None
        known = self._positions.get((call, self.region))
        if known is None or known[0] is not pe or known[1] is not queried:
            if queried is None:
                rows = torch.arange(pe.shape[2], device=pe.device)
            else:
                text = inputs["llm_embedding"].shape[1]
                rows = torch.cat([torch.arange(text, device=queried.device), queried + text])
            _dynamic((rows, 0))
            known = self._positions[call, self.region] = (pe, queried, rows, pe if queried is None else pe[:, :, rows])
        return known[2], known[3]

    def _new_cache(self, img: Tensor, text: int) -> KV:
        p, dtype = self.model.params, self.engine.dtype  # the attention's inputs are in the compute dtype
        shape = (img.shape[0], p.num_heads, text + img.shape[1], p.hidden_size // p.num_heads)
        count = len(self.model.double_blocks) + len(self.model.single_blocks)
        cache = [(img.new_empty(shape, dtype=dtype), img.new_empty(shape, dtype=dtype)) for _ in range(count)]
        _dynamic(*((t, 2) for kv in cache for t in kv))
        return cache

    def _blocks(self, inputs: dict[str, Tensor], windows: list[Tensor]) -> Tensor:
        """`Step1XEdit.forward`, each block given its own key/value window as its RoPE table."""
        m, t = self.model, inputs["timestep"]
        txt, y = m.condition(inputs["llm_embedding"], t, inputs["llm_mask"],
                             *(inputs[n] for n in ("text_embeds", "text_mask") if n in inputs))
        img, txt, vec = m.embed(inputs["img"], txt, y, t)
        pes = iter(windows)
        for block in m.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=next(pes))
        x = torch.cat((txt, img), 1)
        for block in m.single_blocks:
            x = block(x, vec=vec, pe=next(pes))
        return m.final_layer(x[:, txt.shape[1]:, ...], vec)


class RegionUpdate:
    """The loop's update (`sampling.UpdateFn`) for one edit at a time, RegionE deciding each step.

    `begin(lane, grid)` starts an edit; `stats` is the last edit's `RegionStats`.
    """

    def __init__(self, engine: Engine, version: Any, params: RegionParams, full: UpdateFn):
        self.params = params
        self.dit = RegionDiT(engine, version.dit_inputs)
        self.full = full  # the plain edit's update (graphed per shape where graphs are on)
        self.region: StepFn = version.step(self.dit)
        self.gamma = gamma_for(version.config.version)
        self.stats = RegionStats()
        self.plan: RegionPlan | None = None
        self.grid = (0, 0)
        self.t = torch.zeros(0)
        self.step = 0
        self.velocity: Tensor | None = None  # the last computed step's (all tokens, or the edited ones)
        self.edited: Tensor | None = None  # the partition's edited noisy tokens (ascending)

    def begin(self, lane: Lane, grid: tuple[int, int]) -> None:
        if lane.steps != REGION_STEPS:
            raise InputError(f"cache regione: RegionE's decay constants were fitted for {REGION_STEPS} steps; "
                             f"got steps={lane.steps} (pass steps={REGION_STEPS} or another cache)")
        if lane.ref.shape[1] != lane.x.shape[1]:
            raise InputError("cache regione needs an input image: text-to-image has no reference to compare with")
        self.t = lane.t.detach().cpu()
        self.plan = region_plan(self.params, self.t, self.gamma)
        self.grid, self.step, self.velocity, self.edited, self.dit.queried = grid, 0, None, None, None
        self.stats = RegionStats(image_tokens=lane.x.shape[1])

    def __call__(self, x: Tensor, ref: Tensor, guidance: Tensor, t: Tensor, dt: Tensor, rescale: Tensor,
                 *conditioning: Tensor) -> Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"cache regione runs one edit at a time, got a batch of {x.shape[0]}")
        assert self.plan is not None, "begin() first"
        i, kind = self.step, self.plan.kinds[self.step]
        cfg = (guidance, t, rescale, conditioning)
        if kind == FULL:
            out, tokens = self.full(x, ref, guidance, t, dt, rescale, *conditioning), 2 * x.shape[1]
        elif kind == CAPTURE:
            out, tokens = self._capture(i, x, ref, dt, cfg), 2 * x.shape[1]
        else:
            out, tokens = self._region_step(i, kind, x, ref, dt, cfg)
        self.stats.record_step(kind, tokens)
        self.step += 1
        if REGION not in self.plan.kinds[self.step :]:  # no later step reads the keys and values
            self.dit.release()
        return out

    def _velocity(self, step_fn: StepFn, img: Tensor, n: int, guidance: Tensor, t: Tensor, rescale: Tensor,
                  conditioning: tuple[Tensor, ...]) -> Tensor:
        """`guided_euler`'s CFG over the first n tokens of one DiT call on img [1, *, 64]."""
        pred = step_fn(img.repeat_interleave(2, dim=0), t.repeat_interleave(2), *conditioning)
        return cfg_combine(pred[0:1], pred[1:2], guidance[0:1].view(1, 1, 1), rescale[0:1].view(1, 1, 1))[:, :n]

    def _capture(self, i: int, x: Tensor, ref: Tensor, dt: Tensor, cfg: tuple[Any, ...]) -> Tensor:
        """A full step that records keys and values; the partition on the first; the unedited tokens jump."""
        assert self.plan is not None
        self.dit.start(region=False)
        v = self.velocity = self._velocity(self.region, torch.cat([x, ref], dim=1), x.shape[1], *cfg)
        if i == self.plan.partition_step:
            self.edited = edited_tokens((x - self.t[i].to(x.device) * v)[0], ref[0], self.grid, self.params)
        edited = self.edited
        assert edited is not None
        n = x.shape[1]  # the reference rows follow the noisy ones
        self.dit.queried = edited if self.params.ref_kv else torch.cat([edited, n + torch.arange(n, device=x.device)])
        self.stats.edited[i] = edited.tolist()
        out = x + dt.view(1, 1, 1) * v
        unedited = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        unedited[edited] = False
        rows = unedited.nonzero().flatten()
        jump = (self.t[self.plan.jumps[i]] - self.t[i]).to(x.device)
        return out.index_copy(1, rows, x[:, rows] + jump * v[:, rows])

    def _region_step(self, i: int, kind: str, x: Tensor, ref: Tensor, dt: Tensor,
                     cfg: tuple[Any, ...]) -> tuple[Tensor, int]:
        """The edited tokens' step: the DiT on them (and the reference tokens where their keys and values are not
        cached), or the last velocity scaled (reuse)."""
        assert self.plan is not None and self.edited is not None and self.velocity is not None
        edited = self.edited
        if edited.numel() == 0:
            return x, 0
        xe = x[:, edited]
        tokens = 0
        if kind == REGION:
            self.dit.start(region=True)
            img = xe if self.params.ref_kv else torch.cat([xe, ref], dim=1)
            v = self.velocity = self._velocity(self.region, img, xe.shape[1], *cfg)
            tokens = img.shape[1]
        else:
            assert kind == REUSE
            if self.velocity.shape[1] != xe.shape[1]:  # the full step's velocity: its edited rows
                self.velocity = self.velocity[:, edited]
            v = self.velocity * self.plan.ratios[i]
        return x.index_copy(1, edited, xe + dt.view(1, 1, 1) * v), tokens
