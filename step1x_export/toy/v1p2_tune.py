"""Fine-tune the toy's DiT and connector through v1.2's prompt path: the `toy-v1.2` model.

    python -m step1x_export.toy.v1p2_tune [--out DIR] [--seed 0] [--quick] [--evaluate-only]

The toy (v1.1 architecture) reads its instruction after the image, padded to 64 tokens, at v1.1's RoPE
positions. v1.2 (ReasonEdit) has the same DiT but its own conditioning: a new edit prefix with the instruction
before the image, trimmed texts of their own length, mRoPE text positions with the MLLM's image tokens placed on
the latent grid, and a text-token mapping (zero here at the start: none of the toy's instructions quotes
anything, so it stays zero). The toy's DiT does not edit from that conditioning (10-12 dB on its tasks, below
returning the input); this run teaches it to, on the sampler's own shifted timesteps, the toy's tasks and
images (drawn as its training draws them), with its frozen autoencoder and MLLM, which the v1.2 toy reuses from
the toy's folder instead of shipping copies (`shared.json`). The target is the toy itself (`teacher_share`):
the toy's prediction for the same noisy latent, timestep, text and view under v1.1's conditioning, which has
none of the rectified-flow target's noise (the toy's own velocity estimate, not one sample of it), so the loss
falls towards zero as the v1.2 path learns to read what the v1.1 path reads.

Each training shape's conditioning is what inference computes: v1.2's embedder over an image of that very
shape (`mllm_views` of its training images), `branch_inputs` for the positions. A batch mixes texts of several
lengths: each is padded to the longest, masked in the connector and, through `KeyPaddingMask`, in the DiT's
joint attention, as v1.2's one-call CFG runs it. Seeded; on one machine, runs with the same `threads` are
bit-identical. figures.json records the plan, the weights it started from, and the per-shape task tables
beside the toy's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..files import write_text_atomic
from ..hashing import file_sha256
from ..instructions import KNOWN_TASKS_FILE, known_tasks_json
from ..sources import PACKAGED, small_pipeline
from ..step1x_ref.configs import get_config
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.imaging import tensor_to_pil
from ..step1x_ref.mllm.conditioner_v1p2 import Qwen25VLEmbedderV12
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.sampling import schedule_mu, time_shift
from ..step1x_ref.versions.v1p2 import BRANCH_INPUTS, with_rules
from ..step1x_ref.versions.v1p2_joint import KeyPaddingMask, key_mask, pad_text
from ..step1x_ref.versions.v1p2_positions import branch_inputs
from ..step1x_ref.weights.loading import DIT_FILES, SHARED_FILE
from ..threads import torch_threads
from .autoencoder_phase import lr_at, set_lr
from .data import EVAL_SHAPES, TRAIN_PHOTOS, image_batch, photo_tensors
from .dit_phase import optimizer_step, shape_latents, task_draw_weights
from .plan import TrainPlan, training_shapes
from .tasks import GLOBAL_TASKS

NAME = "toy-v1.2"
BASE = "toy"
FIGURES_FILE = "figures.json"


@dataclass(frozen=True)
class TunePlan:
    """Every number a fine-tune follows (recorded in figures.json). The images are drawn as the toy's training
    draws them (`image_batch`, the same seed offset), at the toy's size levels."""

    seed: int = 0
    # The weights' bits follow the thread count (see TrainPlan.threads). One: the shipped run shared the 2-core
    # machine with a training run at higher priority, where a second thread only waits.
    threads: int = 1
    # Every other size level of the toy's (44 shapes of its 75): the toy's DiT already edits at the others, and
    # a run within ~15 minutes on a shared 2-core machine embeds each shape's texts twice (v1.1 and v1.2).
    levels: tuple[int, ...] = (64, 96, 128, 160)
    pool_per_shape: int = 6  # training images per shape (drawn as the toy's are: a fine-tune needs fewer)
    drawn_share: float = TrainPlan.drawn_share
    mllm_views: int = 1  # per shape: the first images of its pool, each embedded with every instruction
    phrasings: int = 0  # instructions of each task trained on, the first ones (0: all, English and Chinese)
    steps: int = 1200
    tokens: int = 2560  # sequence tokens (text + noisy + reference) per step, as the toy's training
    # The toy's peak. Measured at 400 steps on size levels 64 and 80 (mean task PSNR at 64x64, one thread): 3e-4
    # 15.7 dB, 1e-3 17.5, 2e-3 17.7 with the flow target alone; 1e-3 with the teacher's 17.7, its loss falling
    # 0.08 -> 0.018 where the flow target's stays at its noise floor (~0.2).
    lr: float = 1e-3
    warmup: int = 50
    ema: float = 0.995
    # The loss: this share of the squared error against the toy's own prediction (the toy given v1.1's
    # conditioning of the same text and view: the teacher), the rest against the rectified-flow target.
    teacher_share: float = 1.0
    instruction_dropout: float = TrainPlan.instruction_dropout
    task_weights: tuple[tuple[str, float], ...] = TrainPlan.task_weights
    eval_views: int = 1  # per held-out image and evaluated shape (1: its centre crop), as the toy's tables

    @classmethod
    def quick(cls, seed: int = 0) -> TunePlan:
        """A few steps at size level 64, one phrasing a task (tests of determinism and of the plumbing)."""
        return cls(seed=seed, threads=1, levels=(64,), pool_per_shape=2, mllm_views=1, phrasings=1, steps=3,
                   tokens=200, warmup=1)


def plan_from_json(values: dict) -> TunePlan:
    """The plan figures.json records (JSON turned its tuples into lists)."""
    return TunePlan(**{k: tuple(map(tuple, v)) if k == "task_weights" else tuple(v) if isinstance(v, list) else v
                       for k, v in values.items()})


@dataclass
class ShapeData:
    """One shape's training data: packed latents of its images [P, N, 64] and of every task's target
    [P, T, N, 64]; every (text, view)'s v1.2 DiT inputs, texts padded to the shape's longest, indexed
    [text, view] (the last text is "")."""

    shape: tuple[int, int]
    refs: Tensor
    targets: Tensor
    conditioning: dict[str, Tensor]
    teacher_pe: Tensor  # v1.1's RoPE table at this shape (its text padded to a fixed length)
    teacher_text: tuple[Tensor, Tensor]  # v1.1's (llm_embedding, llm_mask) of every (text, view) [T, V, ...]

    @property
    def tokens(self) -> int:
        return self.refs.shape[1]

    @property
    def text_len(self) -> int:
        return self.conditioning["llm_embedding"].shape[2]


def prompts(plan: TunePlan) -> tuple[list[str], list[int]]:
    """The instructions trained on, then "" (the CFG branch's text), and each instruction's task index."""
    pairs = [(k, text) for k, task in enumerate(GLOBAL_TASKS) for text in task.instructions[: plan.phrasings or None]]
    return [text for _, text in pairs] + [""], [k for k, _ in pairs]


@torch.inference_mode()
def teacher_conditioning(embedder, views: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
    """The toy's (v1.1) conditioning of every text on every view: llm_embedding [T, V, L, C], llm_mask [T, V, L]."""
    encoded = [embedder(texts, tensor_to_pil(view)) for view in views]
    return torch.stack([e for e, _ in encoded], 1), torch.stack([m for _, m in encoded], 1)


@torch.inference_mode()
def shape_conditioning(embedder: Qwen25VLEmbedderV12, views: Tensor, texts: list[str]) -> dict[str, Tensor]:
    """v1.2's DiT inputs of every text on every view [V, 3, H, W] (as an edit of that view computes them),
    stacked [T, V, ...] with texts zero-padded to the longest and masked."""
    h, w = views.shape[-2:]
    config = get_config(NAME)
    rows = []
    for view in views:
        encoded = embedder(texts, tensor_to_pil(view))
        rows.append([[branch_inputs(config, text, h // 16, w // 16)[name] for name in BRANCH_INPUTS]
                     for text in encoded])
    length = max(r[1].shape[1] for row in rows for r in row)
    padded = [[pad_text(r, length) for r in row] for row in rows]  # [V][T] tuples of [1, ...] tensors
    stacked = (torch.stack([torch.cat([padded[v][t][i] for v in range(len(rows))]) for t in range(len(texts))])
               for i in range(len(BRANCH_INPUTS)))
    return {name: x.float() if x.is_floating_point() else x for name, x in zip(BRANCH_INPUTS, stacked, strict=True)}


def build_data(plan: TunePlan, base: Step1XEditPipeline, log) -> list[ShapeData]:
    """Every training shape's latents and conditioning, from the seeded image draws."""
    gen = torch.Generator().manual_seed(plan.seed + 30)
    photos = photo_tensors(TRAIN_PHOTOS, max_short_side=320)
    embedder = with_rules(base.embedder, get_config(NAME))
    texts, _ = prompts(plan)
    data = []
    for w, h in training_shapes(plan):  # reads plan.levels only
        pool = image_batch(photos, plan.pool_per_shape, w, h, gen, plan.drawn_share)
        views = pool[: plan.mllm_views]
        teacher_text = teacher_conditioning(base.embedder, views, texts)
        latents = shape_latents(base.model, base.ae, [pool], teacher_text[0].shape[2], GLOBAL_TASKS)[0]
        data.append(ShapeData((w, h), latents.refs, latents.targets, shape_conditioning(embedder, views, texts),
                              latents.pe, teacher_text))
    log(f"{len(data)} shapes, {plan.pool_per_shape} images and {plan.mllm_views} MLLM views each; text lengths "
        f"{min(d.text_len for d in data)}..{max(d.text_len for d in data)} tokens")
    return data


def start_model(base: Step1XEdit) -> Step1XEdit:
    """v1.2's DiT with the toy's weights, its text-token mapping zero (no quoted text contributes yet)."""
    model = Step1XEdit(get_config(NAME))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or {k.split(".")[0] for k in missing} != {"text_token_mapping"}:
        raise ValueError(f"the toy's DiT does not match {NAME}'s: missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(model.text_token_mapping.weight)
    nn.init.zeros_(model.text_token_mapping.bias)
    return model


@dataclass
class Batch:
    x_t: Tensor  # [B, N, 64] the noisy target tokens, then the reference's
    t: Tensor
    cond: tuple[Tensor, ...]  # v1.2's DiT inputs, in BRANCH_INPUTS' order
    velocity: Tensor  # the rectified-flow target
    teacher: tuple[Tensor, Tensor, Tensor]  # the toy's (pe, llm_embedding, llm_mask) of the same texts


def draw_batch(shape: ShapeData, plan: TunePlan, by_task: list[Tensor], draw: Tensor, gen: torch.Generator) -> Batch:
    """One step's batch: images, tasks, instructions (dropped to "" at the plan's rate), views and timesteps."""
    n = shape.tokens
    b = max(1, plan.tokens // (2 * n + shape.text_len))
    img_idx = torch.randint(0, shape.refs.shape[0], (b,), generator=gen)
    task_idx = torch.multinomial(draw, b, replacement=True, generator=gen)
    choice = torch.randint(0, 1 << 20, (b,), generator=gen)
    prompt = torch.stack([by_task[t][c % len(by_task[t])] for t, c in zip(task_idx.tolist(), choice, strict=True)])
    uncond = shape.conditioning["llm_mask"].shape[0] - 1
    prompt = torch.where(torch.rand(b, generator=gen) < plan.instruction_dropout, uncond, prompt)
    view = torch.randint(0, shape.conditioning["llm_mask"].shape[1], (b,), generator=gen)
    t = time_shift(schedule_mu(n), 1.0, torch.rand(b, generator=gen).clamp(1e-4, 1 - 1e-4))
    noise = torch.randn(b, n, 64, generator=gen)
    x0 = shape.targets[img_idx, task_idx]
    tt = t[:, None, None]
    cond = tuple(shape.conditioning[name][prompt, view] for name in BRANCH_INPUTS)
    emb, mask = (x[prompt, view] for x in shape.teacher_text)
    x_t = torch.cat([(1 - tt) * x0 + tt * noise, shape.refs[img_idx]], dim=1)
    return Batch(x_t, t, cond, noise - x0, (shape.teacher_pe, emb, mask))


def batch_loss(model: Step1XEdit, teacher: Step1XEdit, batch: Batch, share: float) -> Tensor:
    """`share` x MSE against the teacher's prediction + the rest x MSE against the flow target."""
    n = batch.velocity.shape[1]
    with KeyPaddingMask(key_mask(batch.cond[2], batch.x_t.shape[1])):
        pred = model(batch.x_t, batch.cond[0], batch.t, *batch.cond[1:])[:, :n]
    loss = (1 - share) * F.mse_loss(pred, batch.velocity) if share < 1 else pred.new_zeros(())
    if share > 0:
        with torch.no_grad():
            target = teacher(batch.x_t, batch.teacher[0], batch.t, *batch.teacher[1:])[:, :n]
        loss = loss + share * F.mse_loss(pred, target)
    return loss


def tune_dit(model: Step1XEdit, teacher: Step1XEdit, data: list[ShapeData], plan: TunePlan, log) -> AveragedModel:
    """The toy's objective (and its prediction) through v1.2's conditioning; returns the EMA of the weights."""
    gen = torch.Generator().manual_seed(plan.seed + 20)
    _, prompt_task = prompts(plan)
    by_task = [torch.tensor([i for i, k in enumerate(prompt_task) if k == t]) for t in range(len(GLOBAL_TASKS))]
    draw = task_draw_weights(plan.task_weights, GLOBAL_TASKS)
    model.train().requires_grad_(True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(plan.ema))
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0)
    for step in range(plan.steps):
        shape = data[int(torch.randint(0, len(data), (), generator=gen))]
        batch = draw_batch(shape, plan, by_task, draw, gen)
        set_lr(opt, lr_at(step, plan.steps, plan.lr, plan.warmup))
        loss = batch_loss(model, teacher, batch, plan.teacher_share)
        optimizer_step(model, opt, ema, loss)
        if step % 100 == 0 or step == plan.steps - 1:
            w, h = shape.shape
            log(f"dit {step + 1}/{plan.steps} {w}x{h} x{batch.t.shape[0]} loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    return ema


def tune(plan: TunePlan, log=print) -> Step1XEditPipeline:
    """The whole fine-tune from the shipped toy, seeded; the pipeline's DiT holds the EMA weights."""
    with torch_threads(plan.threads):
        base = small_pipeline(BASE)
        data = build_data(plan, base, log)
        model = start_model(base.model)
        ema = tune_dit(model, base.model, data, plan, log)
        model.load_state_dict(ema.module.state_dict())
    return Step1XEditPipeline(get_config(NAME), model, base.ae, with_rules(base.embedder, get_config(NAME)))


def ship(pipe: Step1XEditPipeline, out: Path) -> Path:
    """Write the DiT + connector, the pointer to the toy's VAE and MLLM, and the tasks it learned."""
    out.mkdir(parents=True, exist_ok=True)
    dit = out / DIT_FILES["v1.2"][0]
    save_file({k: v.contiguous() for k, v in pipe.model.state_dict().items()}, str(dit))
    shared = os.path.relpath(PACKAGED[BASE].resolve(), out.resolve())
    write_text_atomic(out / SHARED_FILE, json.dumps({"vae_and_mllm": shared}) + "\n")
    write_text_atomic(out / KNOWN_TASKS_FILE, known_tasks_json(NAME, {t.name: t.instructions for t in GLOBAL_TASKS}))
    return dit


def evaluate(out: Path, plan: TunePlan, tune_seconds: float, log=print) -> str:
    """Load `out` as any model folder is loaded, score it at the toy's evaluated shapes (fp32, one thread),
    beside the toy's own tables (its figures.json: the same views), and write figures.json there."""
    from .evaluate import TaskScore, format_scores, level_of, shape_scores

    config = get_config(NAME)
    loaded = Step1XEditPipeline.from_pretrained(out, config=config, dtype=torch.float32)
    toy_figures = json.loads((PACKAGED[BASE] / FIGURES_FILE).read_text())
    tables, columns = {}, {}

    def edit(image, instruction):  # its own steps and CFG (the config's), at the view's size
        return loaded.edit(image, instruction, seed=0, size_level=level_of(image))

    with torch_threads(1):
        for w, h in EVAL_SHAPES:
            scores = shape_scores(edit, (w, h), views_per_image=plan.eval_views, tasks=GLOBAL_TASKS)
            tables[f"{w}x{h}"] = scores
            columns[f"{NAME} {w}x{h}"] = scores
            toy = toy_figures["tasks"].get(f"{w}x{h}")
            if toy is not None:
                columns[f"toy {w}x{h}"] = [TaskScore(**s) for s in toy]
            log(f"evaluated {w}x{h}")
    figures = {"plan": asdict(plan), "tune_seconds": round(tune_seconds, 1), "threads": plan.threads,
               "steps": config.default_steps, "cfg": config.default_cfg,
               "started_from": {"model": BASE, "dit_sha256": _base_dit_sha256()},
               "tasks": {shape: [asdict(s) for s in scores] for shape, scores in tables.items()}}
    write_text_atomic(out / FIGURES_FILE, json.dumps(figures, indent=1))
    return format_scores(columns)


def _base_dit_sha256() -> str:
    return file_sha256(PACKAGED[BASE] / DIT_FILES[get_config(BASE).version][0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m step1x_export.toy.v1p2_tune", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGED[NAME], help=f"weights folder [default: {PACKAGED[NAME]}]")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw [0]")
    parser.add_argument("--quick", action="store_true", help="a few steps at size level 64 (plumbing check)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only re-score the weights in --out (keeps the fine-tune's recorded plan and time)")
    args = parser.parse_args(argv)
    plan = TunePlan.quick(args.seed) if args.quick else TunePlan(seed=args.seed)
    start = time.perf_counter()
    if args.evaluate_only:
        recorded = json.loads((args.out / FIGURES_FILE).read_text())
        plan, seconds = plan_from_json(recorded["plan"]), recorded["tune_seconds"]
    else:
        pipe = tune(plan, log=lambda m: print(f"[{time.perf_counter() - start:7.1f} s] {m}", flush=True))
        seconds = time.perf_counter() - start
        ship(pipe, args.out)
    evaluating = time.perf_counter()
    print(evaluate(args.out, plan, seconds))
    print(f"tuned in {seconds:.0f} s, evaluated in {time.perf_counter() - evaluating:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
