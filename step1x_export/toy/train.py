"""Train the `toy` model from scratch: autoencoder first, then the DiT and connector.

    python -m step1x_export.toy.train [--out DIR] [--seed 0] [--quick]

The MLLM (the tiny Qwen2.5-VL with our tokenizer) stays as its seeded random initialisation, frozen:
the connector learns to read its hidden states. The DiT learns rectified flow on the sampler's own
shifted timesteps, with the instruction dropped (replaced by "", as the CFG branch has it) 15% of the
time so true CFG works; mirroring and inverting are drawn more often than the other tasks
(`TrainPlan.task_weights`). Data: augmented crops of the training photos (`data.TRAIN_PHOTOS`); the held-out
photos are used only for the figures printed (the autoencoder's reconstruction after its phase, every task
at the end), never to train. One CPU thread: deterministic, and on a shared
2-core machine faster than two (no OpenMP barriers waiting on a busy core).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..step1x_ref.configs import ModelConfig, get_config
from ..step1x_ref.dit.math import rope_table
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.imaging import tensor_to_pil
from ..step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.sampling import pack, position_ids, schedule_mu, time_shift
from ..step1x_ref.vae.autoencoder import AutoEncoder
from .data import TRAIN_PHOTOS, crop_batch, heldout_views, photo_tensors
from .tasks import TASKS, psnr
from .weights import FIGURES_FILE, TOY_CFG, TOY_SIZE, TOY_STEPS, WEIGHTS_DIR


@dataclass(frozen=True)
class TrainPlan:
    seed: int = 0
    size: int = TOY_SIZE  # edit resolution (px)
    pool: int = 1200  # augmented training crops (shared by both phases)
    ae_steps: int = 2000  # at ae_crop px, batch ae_batch
    ae_crop: int = 32
    ae_batch: int = 8
    ae_full_steps: int = 500  # then at the edit resolution, batch ae_batch // 2
    ae_lr: float = 1e-3
    latent_norm_weight: float = 0.05  # keeps each latent channel ~N(0, 1): scale 1 / shift 0 in the config
    dit_steps: int = 6000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.998
    instruction_dropout: float = 0.15
    # Tasks drawn more often than the others (the rest weigh 1): mirroring moves content across the
    # image, which the DiT can only do through RoPE's relative positions, and it learns that last.
    task_weights: tuple[tuple[str, float], ...] = (("mirror", 3.0), ("invert", 1.5))
    mllm_views: int = 24  # pool images the MLLM sees with each instruction
    eval_views: int = 4  # per held-out photo

    @classmethod
    def quick(cls, seed: int = 0) -> TrainPlan:
        """A few steps of everything (tests of determinism and of the plumbing)."""
        return cls(seed=seed, pool=8, ae_steps=2, ae_full_steps=1, dit_steps=2, dit_batch=4, warmup=1,
                   mllm_views=1, eval_views=1)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def build_untrained(config: ModelConfig, seed: int) -> tuple[Step1XEdit, AutoEncoder, Qwen25VLEmbedder]:
    """Seeded initial weights: PyTorch's default init, the DiT's output layer zeroed (it starts by predicting 0)."""
    torch.manual_seed(seed)
    model = Step1XEdit(config)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    torch.manual_seed(seed + 1)
    ae = AutoEncoder(config.vae)
    embedder = Qwen25VLEmbedder.tiny(config.tiny_qwen, params=config.embedder, seed=seed + 2)
    return model, ae, embedder


def random_task_images(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image replaced by one task's target at random: the autoencoder must also reproduce the edits."""
    picks = torch.randint(0, len(TASKS), (x.shape[0],), generator=gen).tolist()
    return torch.stack([TASKS[k].target(img[None])[0] for k, img in zip(picks, x, strict=True)])


def latent_norm_penalty(z: Tensor) -> Tensor:
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3))
    return mean.pow(2).mean() + (std - 1).pow(2).mean()


def train_autoencoder(ae: AutoEncoder, pool: Tensor, plan: TrainPlan, log) -> None:
    """Reconstruction (MSE + 0.1 L1 in [-1, 1]) on crops of the pool and their task targets."""
    gen = torch.Generator().manual_seed(plan.seed + 10)
    opt = torch.optim.Adam(ae.parameters(), lr=plan.ae_lr)
    ae.train().requires_grad_(True)
    total = plan.ae_steps + plan.ae_full_steps
    for step in range(total):
        full = step >= plan.ae_steps
        batch, side = (plan.ae_batch // 2, plan.size) if full else (plan.ae_batch, plan.ae_crop)
        idx = torch.randint(0, pool.shape[0], (batch,), generator=gen)
        x = random_task_images(pool[idx], gen)
        if not full:
            top, left = torch.randint(0, plan.size - side + 1, (2,), generator=gen).tolist()
            x = x[..., top : top + side, left : left + side]
        x = x * 2 - 1
        set_lr(opt, lr_at(step, total, plan.ae_lr, plan.warmup))
        z = ae.encoder(x).chunk(2, dim=1)[0]
        out = ae.decoder(z)
        mse = F.mse_loss(out, x)
        loss = mse + 0.1 * (out - x).abs().mean() + plan.latent_norm_weight * latent_norm_penalty(z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"ae {step + 1}/{total} mse {mse.item():.5f} ({10 * math.log10(4 / mse.item()):.2f} dB)")
    ae.eval().requires_grad_(False)


@torch.inference_mode()
def heldout_reconstruction_db(ae: AutoEncoder, size: int) -> float:
    """Mean PSNR of decode(encode(x)) over the held-out views: the ceiling every edit's figure sits under."""
    _, views = heldout_views(size)
    out = ae.decode(ae.encode(views * 2 - 1)).clamp(-1, 1) * 0.5 + 0.5
    return psnr(out, views).mean().item()


@torch.inference_mode()
def encode_pool(ae: AutoEncoder, pool: Tensor, chunk: int = 100) -> tuple[Tensor, Tensor]:
    """Packed latents of the pool images [P, N, 64] and of every task's target [P, T, N, 64]."""
    def enc(x: Tensor) -> Tensor:
        return torch.cat([pack(ae.encode(x[i : i + chunk] * 2 - 1)) for i in range(0, x.shape[0], chunk)])

    refs = enc(pool)
    targets = torch.stack([refs if t.name == "no_change" else enc(t.target(pool)) for t in TASKS], dim=1)
    return refs, targets


@torch.inference_mode()
def embed_instructions(embedder: Qwen25VLEmbedder, images: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """MLLM embeddings of every instruction, and of "" last, with each of `images` as the picture:
    emb [I + 1, V, L, C], mask [I + 1, V, L], and the task index of each instruction."""
    prompts = [(k, text) for k, task in enumerate(TASKS) for text in task.instructions]
    texts = [text for _, text in prompts] + [""]
    embs, masks = [], []
    for img in images:
        emb, mask = embedder(texts, tensor_to_pil(img))
        embs.append(emb)
        masks.append(mask)
    return torch.stack(embs, 1), torch.stack(masks, 1), [k for k, _ in prompts]


def task_draw_weights(plan: TrainPlan) -> Tensor:
    weights = dict(plan.task_weights)
    unknown = set(weights) - {t.name for t in TASKS}
    if unknown:
        raise ValueError(f"TrainPlan.task_weights names unknown tasks {sorted(unknown)}; "
                         f"known: {[t.name for t in TASKS]}")
    return torch.tensor([float(weights.get(t.name, 1.0)) for t in TASKS])


def train_dit(model: Step1XEdit, refs: Tensor, targets: Tensor, emb: Tensor, mask: Tensor, prompt_task: list[int],
              plan: TrainPlan, log) -> AveragedModel:
    """Rectified flow: x_t = (1 - t) x0 + t noise, the DiT predicts noise - x0 from (x_t | reference)."""
    gen = torch.Generator().manual_seed(plan.seed + 20)
    n_tokens = refs.shape[1]
    grid = plan.size // 16
    pe = rope_table(position_ids(emb.shape[2], grid, grid, "v1.1"), model.params.axes_dim, model.params.theta)
    mu = schedule_mu(n_tokens)
    by_task = [torch.tensor([i for i, k in enumerate(prompt_task) if k == t]) for t in range(len(TASKS))]
    uncond = emb.shape[0] - 1
    draw = task_draw_weights(plan)
    model.train().requires_grad_(True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(plan.ema))
    opt = torch.optim.AdamW(model.parameters(), lr=plan.dit_lr, weight_decay=0.0)
    for step in range(plan.dit_steps):
        b = plan.dit_batch
        img_idx = torch.randint(0, refs.shape[0], (b,), generator=gen)
        task_idx = torch.multinomial(draw, b, replacement=True, generator=gen)
        choice = torch.randint(0, 1 << 20, (b,), generator=gen)
        prompt = torch.stack([by_task[t][c % len(by_task[t])] for t, c in zip(task_idx.tolist(), choice, strict=True)])
        prompt = torch.where(torch.rand(b, generator=gen) < plan.instruction_dropout, uncond, prompt)
        view = torch.randint(0, emb.shape[1], (b,), generator=gen)
        t = time_shift(mu, 1.0, torch.rand(b, generator=gen).clamp(1e-4, 1 - 1e-4))
        noise = torch.randn(b, n_tokens, 64, generator=gen)
        x0, ref = targets[img_idx, task_idx], refs[img_idx]
        tt = t[:, None, None]
        x_t = (1 - tt) * x0 + tt * noise
        set_lr(opt, lr_at(step, plan.dit_steps, plan.dit_lr, plan.warmup))
        pred = model(torch.cat([x_t, ref], dim=1), pe, t, emb[prompt, view], mask[prompt, view])[:, :n_tokens]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        if step % 100 == 0 or step == plan.dit_steps - 1:
            log(f"dit {step + 1}/{plan.dit_steps} loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    return ema


def train(plan: TrainPlan, log=print, ae_checkpoint: Path | None = None) -> Step1XEditPipeline:
    """Every phase, seeded; returns the trained pipeline (the DiT holds the EMA weights).

    Each phase draws from its own seeded generator, so with `ae_checkpoint` the autoencoder phase is saved
    there on its first run and read back on later ones: the DiT phase then runs exactly as from scratch.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(plan, log, ae_checkpoint)
    finally:
        torch.set_num_threads(threads)


def _train(plan: TrainPlan, log, ae_checkpoint: Path | None) -> Step1XEditPipeline:
    config = get_config("toy")
    model, ae, embedder = build_untrained(config, plan.seed)
    gen = torch.Generator().manual_seed(plan.seed + 30)
    t0 = time.perf_counter()
    pool = crop_batch(photo_tensors(TRAIN_PHOTOS, max_short_side=320), plan.pool, plan.size, gen)
    log(f"{plan.pool} training crops of {len(TRAIN_PHOTOS)} photos in {time.perf_counter() - t0:.0f} s")
    if ae_checkpoint is not None and ae_checkpoint.is_file():
        ae.load_state_dict(load_file(str(ae_checkpoint)))
        ae.eval().requires_grad_(False)
        log(f"autoencoder read from {ae_checkpoint}")
    else:
        train_autoencoder(ae, pool, plan, log)
        if ae_checkpoint is not None:
            save_file(ae.state_dict(), str(ae_checkpoint))
    log(f"autoencoder trained at {time.perf_counter() - t0:.0f} s; held-out reconstruction "
        f"{heldout_reconstruction_db(ae, plan.size):.2f} dB (reported, never trained on)")
    refs, targets = encode_pool(ae, pool)
    log(f"latents std {refs.std().item():.3f} mean {refs.mean().item():.3f}; "
        f"encoded at {time.perf_counter() - t0:.0f} s")
    emb, mask, prompt_task = embed_instructions(embedder, pool[: plan.mllm_views])
    log(f"{len(prompt_task)} instructions embedded at {time.perf_counter() - t0:.0f} s")
    ema = train_dit(model, refs, targets, emb, mask, prompt_task, plan, log)
    model.load_state_dict(ema.module.state_dict())
    log(f"DiT trained at {time.perf_counter() - t0:.0f} s")
    return Step1XEditPipeline(config, model, ae, embedder)


def evaluate_weights(out: Path, plan: TrainPlan, train_seconds: float) -> str:
    """Load `out` as any checkpoint is loaded, score it on the held-out photos, write figures.json there."""
    from .evaluate import format_scores, task_scores

    loaded = Step1XEditPipeline.from_pretrained(out, config=get_config("toy"), dtype=torch.float32)

    def edit(image, instruction):
        return loaded.edit(image, instruction, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=plan.size)

    scores = task_scores(edit, plan.size, views_per_photo=plan.eval_views)
    figures = {"plan": asdict(plan), "train_seconds": round(train_seconds, 1), "threads": 1,
               "steps": TOY_STEPS, "cfg": TOY_CFG, "tasks": [asdict(s) for s in scores]}
    (out / FIGURES_FILE).write_text(json.dumps(figures, indent=1))
    return format_scores({f"toy fp32 ({TOY_STEPS} steps, cfg {TOY_CFG})": scores})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m step1x_export.toy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"weights folder [default: {WEIGHTS_DIR}]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of each phase (plumbing check)")
    parser.add_argument("--ae-checkpoint", type=Path, help="save the trained autoencoder here, or read it if present")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only re-score the weights in --out (keeps the training time figures.json has)")
    args = parser.parse_args(argv)
    plan = TrainPlan.quick(args.seed) if args.quick else TrainPlan(seed=args.seed)
    torch.set_num_threads(1)  # the evaluation too: see the module docstring
    start = time.perf_counter()
    if args.evaluate_only:
        recorded = json.loads((args.out / FIGURES_FILE).read_text())
        plan, train_s = TrainPlan(**recorded["plan"]), recorded["train_seconds"]
    else:
        pipe = train(plan, log=lambda m: print(f"[{time.perf_counter() - start:7.1f} s] {m}", flush=True),
                     ae_checkpoint=args.ae_checkpoint)
        train_s = time.perf_counter() - start
        pipe.save_pretrained(args.out)
    evaluating = time.perf_counter()
    print(evaluate_weights(args.out, plan, train_s))
    print(f"trained in {train_s:.0f} s, evaluated in {time.perf_counter() - evaluating:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
