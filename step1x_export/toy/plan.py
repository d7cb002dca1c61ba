"""The toy's training plan: every number a from-scratch run follows (recorded in figures.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..step1x_ref.profiles import TOY_PROFILE

Shape = tuple[int, int]  # (width, height) in pixels, multiples of 16


@dataclass(frozen=True)
class TrainPlan:
    seed: int = 0
    # CPU threads of the training phases. The weights' bits follow it (each thread count splits the sums of
    # convolutions and matmuls its own way), so it is part of what a from-scratch run must repeat. Two threads
    # on an idle 2-core machine train 1.6-2x faster than one (measured on an AVX2 EPYC: autoencoder 0.66 ->
    # 0.35 s a step, DiT 0.24 -> 0.15); this plan on one thread would take ~91 minutes there, over budget.
    threads: int = 2
    levels: tuple[int, ...] = (64, 80, 96, 112, 128, 144, 160)  # size levels the DiT's shapes come from
    pool_per_shape: int = 24  # the DiT's training images of each shape
    drawn_share: float = 0.35  # of the training images: drawn pictures; the rest are crops of photos
    ae_pool: int = 600  # the autoencoder's training images, ae_pool_side px square
    ae_pool_side: int = 128
    ae_steps: int = 3400
    # Square crops, their side cycling through ae_crops, ae_batch of them every step: fewer images a step
    # (a fixed pixel budget at large crops) decoded everything grey.
    ae_crops: tuple[int, ...] = (32, 48, 64)
    ae_batch: int = 8
    ae_lr: float = 1e-3
    latent_norm_weight: float = 0.05  # keeps each latent channel ~N(0, 1): scale 1 / shift 0 in the config
    pca_weight: float = 1.0  # pull of the latent towards the whitened 8x8 patch-PCA code
    dit_steps: int = 12000
    dit_tokens: int = 2560  # sequence tokens (text + noisy + reference) per DiT step: the batch follows the shape
    dit_lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.998
    instruction_dropout: float = 0.15
    # Tasks drawn more often than the others (the rest weigh 1): mirroring moves content across the
    # image, which the DiT can only do through RoPE's relative positions, and it learns that last; swapping
    # red and blue (the demo's edit) and inverting change every colour, and lagged the other tasks.
    task_weights: tuple[tuple[str, float], ...] = (("mirror", 3.0), ("invert", 1.5), ("swap_red_blue", 1.5))
    # Training images (two of every shape) the MLLM sees with each instruction: the connector reads the
    # instruction from hidden states that also carry the image, and beside only 24 images it misread
    # instructions at shapes whose view it had not seen the like of (docs/toy.md).
    mllm_views: int = 150
    eval_views: int = 1  # per held-out image and evaluated shape (1: its centre crop)
    # The fine-tune after the first phase (whose weights it starts from): every task again, with the local
    # task (red things to green) and unknown instructions (against the unchanged picture) added, on fresh
    # images of every shape, tune_faded_share of them faded towards grey (so a near-target input, a faded photo
    # asked for black and white, is one it has seen). Its own generator: the first phase runs as before.
    # Off in the shipped plan: none of the three runs tried learned the local task (docs/toy.md, "A local task,
    # unknown instructions, faded inputs"); the fields below are the last run's (`--set tune_steps=7000`).
    tune_steps: int = 0
    tune_lr: float = 1e-3
    tune_task_weights: tuple[tuple[str, float], ...] = (("mirror", 3.0), ("invert", 1.5), ("swap_red_blue", 1.5),
                                                        ("red_to_green", 5.0), ("unknown", 1.5))
    tune_faded_share: float = 0.2
    tune_red_share: float = 0.6  # of the fine-tune's images: given red things (`data.paint_red_things`)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    @classmethod
    def quick(cls, seed: int = 0) -> TrainPlan:
        """A few steps of everything (tests of determinism and of the plumbing)."""
        return cls(seed=seed, levels=(64,), pool_per_shape=2, ae_pool=4, ae_steps=2, ae_crops=(32, 64),
                   ae_batch=2, dit_steps=2, dit_tokens=160, warmup=1, mllm_views=1, eval_views=1, tune_steps=2)

    def first_phase(self) -> dict:
        """The fields the first phase follows (a plan recorded before the fine-tune existed has just these)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("tune_")}


def plan_from_json(fields: dict) -> TrainPlan:
    """The plan figures.json records (JSON turned its tuples into lists)."""
    return TrainPlan(**{k: tuple(map(tuple, v)) if k.endswith("task_weights") else tuple(v) if isinstance(v, list)
                        else v for k, v in fields.items()})


def with_overrides(plan: TrainPlan, assignments: list[str]) -> TrainPlan:
    """`plan` with each "FIELD=VALUE" applied (VALUE in JSON: 12000, 0.5, [64, 96], [["mirror", 3.0]])."""
    values = asdict(plan)
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or name not in values:
            raise ValueError(f"{assignment!r}: expected FIELD=VALUE, FIELD one of {', '.join(values)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{assignment!r}: the value must be JSON, like the plan's {values[name]!r}") from None
        if not _same_kind(getattr(plan, name), value):
            raise ValueError(f"{assignment!r}: {name} takes a value like {values[name]!r}")
        values[name] = value
    return plan_from_json(values)


def _same_kind(current: object, value: object) -> bool:
    if isinstance(current, tuple):
        return isinstance(value, list)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return type(value) is type(current)


def training_shapes(plan: TrainPlan) -> list[Shape]:
    """Every (width, height) the edit size rule gives at the plan's size levels for aspect ratios within the
    toy's profile, smallest first."""
    shapes = {shape for level in plan.levels for shape in TOY_PROFILE.edit_sizes(level)}
    return sorted(shapes, key=lambda s: (s[0] * s[1], s))
