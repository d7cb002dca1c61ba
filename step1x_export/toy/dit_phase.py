"""The toy's DiT phases: rectified flow on packed latents of every task's exact target, one training shape a
step, the instruction dropped (replaced by "", as the CFG branch has it) some of the time so true CFG works.
The first phase learns the global tasks from the seeded initial weights; the fine-tune (`tune_phase`) runs the
same loop from there with the local task and unknown instructions added."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..step1x_ref.dit.math import rope_table
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.imaging import tensor_to_pil
from ..step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from ..step1x_ref.sampling import pack, position_ids, schedule_mu, time_shift
from ..step1x_ref.vae.autoencoder import AutoEncoder
from .autoencoder_phase import lr_at, set_lr
from .plan import Shape, TrainPlan
from .tasks import Task, unchanged


@dataclass(frozen=True)
class DitRun:
    """One DiT phase's schedule: its steps, peak learning rate, generator seed and task draw weights."""

    steps: int
    lr: float
    seed: int
    task_weights: tuple[tuple[str, float], ...]


def first_phase_run(plan: TrainPlan) -> DitRun:
    return DitRun(plan.dit_steps, plan.dit_lr, plan.seed + 20, plan.task_weights)


def tune_run(plan: TrainPlan) -> DitRun:
    return DitRun(plan.tune_steps, plan.tune_lr, plan.seed + 50, plan.tune_task_weights)


@dataclass
class ShapeLatents:
    """One training shape's data for the DiT: packed latents of its images [P, N, 64], of every task's
    target [P, T, N, 64], and the RoPE table of (text | noisy | reference) positions."""

    shape: Shape
    refs: Tensor
    targets: Tensor
    pe: Tensor

    @property
    def tokens(self) -> int:
        return self.refs.shape[1]


@torch.inference_mode()
def encode_pool(ae: AutoEncoder, pool: Tensor, tasks: tuple[Task, ...], chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Packed latents of the pool images [P, N, 64] and of every task's target [P, T, N, 64] (a task that leaves
    the picture unchanged reuses the image's own latent)."""
    def enc(x: Tensor) -> Tensor:
        return torch.cat([pack(ae.encode(x[i : i + chunk] * 2 - 1)) for i in range(0, x.shape[0], chunk)])

    refs = enc(pool)
    targets = torch.stack([refs if t.target is unchanged else enc(t.target(pool)) for t in tasks], dim=1)
    return refs, targets


def shape_latents(model: Step1XEdit, ae: AutoEncoder, pools: list[Tensor], txt_len: int,
                  tasks: tuple[Task, ...]) -> list[ShapeLatents]:
    out = []
    for pool in pools:
        h, w = pool.shape[-2:]
        refs, targets = encode_pool(ae, pool, tasks)
        pe = rope_table(position_ids(txt_len, h // 16, w // 16, "v1.1"), model.params.axes_dim, model.params.theta)
        out.append(ShapeLatents((w, h), refs, targets, pe))
    return out


@torch.inference_mode()
def embed_instructions(embedder: Qwen25VLEmbedder, images: list[Tensor],
                       tasks: tuple[Task, ...]) -> tuple[Tensor, Tensor, list[int]]:
    """MLLM embeddings of every task's instructions, and of "" last, with each of `images` as the picture:
    emb [I + 1, V, L, C], mask [I + 1, V, L], and the task index of each instruction."""
    prompts = [(k, text) for k, task in enumerate(tasks) for text in task.instructions]
    texts = [text for _, text in prompts] + [""]
    embs, masks = [], []
    for img in images:
        emb, mask = embedder(texts, tensor_to_pil(img))
        embs.append(emb)
        masks.append(mask)
    return torch.stack(embs, 1), torch.stack(masks, 1), [k for k, _ in prompts]


def mllm_images(pools: list[Tensor], count: int) -> list[Tensor]:
    """`count` training images spread over the shapes (the MLLM sees each instruction with all of them)."""
    return [pools[(k * len(pools)) // count][k % pools[0].shape[0]] for k in range(count)]


def task_draw_weights(task_weights: tuple[tuple[str, float], ...], tasks: tuple[Task, ...]) -> Tensor:
    weights = dict(task_weights)
    unknown = set(weights) - {t.name for t in tasks}
    if unknown:
        raise ValueError(f"TrainPlan task weights name tasks {sorted(unknown)} this phase does not train; "
                         f"it trains: {[t.name for t in tasks]}")
    return torch.tensor([float(weights.get(t.name, 1.0)) for t in tasks])


def _randint(n: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, n, (), generator=gen))


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, ema: AveragedModel, loss: Tensor) -> None:
    """One AdamW step on `loss`, gradients clipped to norm 1, then the EMA's update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update_parameters(model)


def train_dit(model: Step1XEdit, data: list[ShapeLatents], emb: Tensor, mask: Tensor, prompt_task: list[int],
              tasks: tuple[Task, ...], run: DitRun, plan: TrainPlan, log) -> AveragedModel:
    """Rectified flow: x_t = (1 - t) x0 + t noise, the DiT predicts noise - x0 from (x_t | reference).
    Each step is one shape drawn at random, with as many images as fit `plan.dit_tokens`."""
    gen = torch.Generator().manual_seed(run.seed)
    by_task = [torch.tensor([i for i, k in enumerate(prompt_task) if k == t]) for t in range(len(tasks))]
    uncond = emb.shape[0] - 1
    draw = task_draw_weights(run.task_weights, tasks)
    model.train().requires_grad_(True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(plan.ema))
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0)
    for step in range(run.steps):
        shape = data[_randint(len(data), gen)]
        n = shape.tokens
        b = max(1, plan.dit_tokens // (2 * n + emb.shape[2]))
        img_idx = torch.randint(0, shape.refs.shape[0], (b,), generator=gen)
        task_idx = torch.multinomial(draw, b, replacement=True, generator=gen)
        choice = torch.randint(0, 1 << 20, (b,), generator=gen)
        prompt = torch.stack([by_task[t][c % len(by_task[t])] for t, c in zip(task_idx.tolist(), choice, strict=True)])
        prompt = torch.where(torch.rand(b, generator=gen) < plan.instruction_dropout, uncond, prompt)
        view = torch.randint(0, emb.shape[1], (b,), generator=gen)
        t = time_shift(schedule_mu(n), 1.0, torch.rand(b, generator=gen).clamp(1e-4, 1 - 1e-4))
        noise = torch.randn(b, n, 64, generator=gen)
        x0, ref = shape.targets[img_idx, task_idx], shape.refs[img_idx]
        tt = t[:, None, None]
        x_t = (1 - tt) * x0 + tt * noise
        set_lr(opt, lr_at(step, run.steps, run.lr, plan.warmup))
        pred = model(torch.cat([x_t, ref], dim=1), shape.pe, t, emb[prompt, view], mask[prompt, view])[:, :n]
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(model, opt, ema, loss)
        if step % 100 == 0 or step == run.steps - 1:
            log(f"dit {step + 1}/{run.steps} {shape.shape[0]}x{shape.shape[1]} x{b} loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    return ema
