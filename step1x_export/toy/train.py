"""Train the `toy` model from scratch: autoencoder first, then the DiT and connector.

    python -m step1x_export.toy.train [--out DIR] [--seed 0] [--quick]

The MLLM (the tiny Qwen2.5-VL with our tokenizer) stays as its seeded random initialisation, frozen:
the connector learns to read its hidden states. The autoencoder learns reconstruction on crops of photos and
drawn pictures, its latent pulled towards the whitened principal components of 8x8 patches (a linear code
that already reconstructs the held-out images at ~28 dB: the conv layers start from a good latent instead of
searching for one, which at 8 images a step on one core they did not find in 25 minutes). The DiT learns
rectified flow on the sampler's own shifted timesteps, with the instruction dropped (replaced by "", as the
CFG branch has it) 15% of the time so true CFG works; mirroring, inverting and swapping red and blue are
drawn more often than the other tasks (`TrainPlan.task_weights`). Every DiT step is one shape of the toy's
profile (size levels and aspect ratios up to 2:1 both ways), its batch sized so each step holds about the same
number of tokens.
Data: augmented crops of the training photos (`data.TRAIN_PHOTOS`) and pictures drawn here (`drawn`); the
held-out images are used only for the figures printed, never to train. `TrainPlan.threads` CPU threads (two by
default): on one machine, runs with the same thread count are bit-identical; the evaluation always uses one.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..files import write_text_atomic
from ..instructions import KNOWN_TASKS_FILE
from ..step1x_ref.configs import ModelConfig, get_config
from ..step1x_ref.dit.math import rope_table
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.imaging import tensor_to_pil
from ..step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.sampling import pack, position_ids, schedule_mu, time_shift
from ..step1x_ref.vae.autoencoder import AutoEncoder
from ..threads import torch_threads
from .autoencoder_phase import lr_at, reconstruction_db, reconstruction_report, set_lr, train_autoencoder
from .data import EVAL_SHAPES, TRAIN_PHOTOS, image_batch, photo_tensors, size_level_for
from .demo import ship_demo_conditioning
from .plan import Shape, TrainPlan, plan_from_json, training_shapes, with_overrides
from .tasks import TASKS, known_tasks_text
from .weights import FIGURES_FILE, TOY_CFG, TOY_SIZE, TOY_STEPS, WEIGHTS_DIR


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
def encode_pool(ae: AutoEncoder, pool: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Packed latents of the pool images [P, N, 64] and of every task's target [P, T, N, 64]."""
    def enc(x: Tensor) -> Tensor:
        return torch.cat([pack(ae.encode(x[i : i + chunk] * 2 - 1)) for i in range(0, x.shape[0], chunk)])

    refs = enc(pool)
    targets = torch.stack([refs if t.name == "no_change" else enc(t.target(pool)) for t in TASKS], dim=1)
    return refs, targets


def shape_latents(model: Step1XEdit, ae: AutoEncoder, pools: list[Tensor], txt_len: int) -> list[ShapeLatents]:
    out = []
    for pool in pools:
        h, w = pool.shape[-2:]
        refs, targets = encode_pool(ae, pool)
        pe = rope_table(position_ids(txt_len, h // 16, w // 16, "v1.1"), model.params.axes_dim, model.params.theta)
        out.append(ShapeLatents((w, h), refs, targets, pe))
    return out


@torch.inference_mode()
def embed_instructions(embedder: Qwen25VLEmbedder, images: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
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


def mllm_images(pools: list[Tensor], count: int) -> list[Tensor]:
    """`count` training images spread over the shapes (the MLLM sees each instruction with all of them)."""
    return [pools[(k * len(pools)) // count][k % pools[0].shape[0]] for k in range(count)]


def task_draw_weights(plan: TrainPlan) -> Tensor:
    weights = dict(plan.task_weights)
    unknown = set(weights) - {t.name for t in TASKS}
    if unknown:
        raise ValueError(f"TrainPlan.task_weights names unknown tasks {sorted(unknown)}; "
                         f"known: {[t.name for t in TASKS]}")
    return torch.tensor([float(weights.get(t.name, 1.0)) for t in TASKS])


def _randint(n: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, n, (), generator=gen))


def train_dit(model: Step1XEdit, data: list[ShapeLatents], emb: Tensor, mask: Tensor, prompt_task: list[int],
              plan: TrainPlan, log) -> AveragedModel:
    """Rectified flow: x_t = (1 - t) x0 + t noise, the DiT predicts noise - x0 from (x_t | reference).
    Each step is one shape drawn at random, with as many images as fit `plan.dit_tokens`."""
    gen = torch.Generator().manual_seed(plan.seed + 20)
    by_task = [torch.tensor([i for i, k in enumerate(prompt_task) if k == t]) for t in range(len(TASKS))]
    uncond = emb.shape[0] - 1
    draw = task_draw_weights(plan)
    model.train().requires_grad_(True)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(plan.ema))
    opt = torch.optim.AdamW(model.parameters(), lr=plan.dit_lr, weight_decay=0.0)
    for step in range(plan.dit_steps):
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
        set_lr(opt, lr_at(step, plan.dit_steps, plan.dit_lr, plan.warmup))
        pred = model(torch.cat([x_t, ref], dim=1), shape.pe, t, emb[prompt, view], mask[prompt, view])[:, :n]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        if step % 100 == 0 or step == plan.dit_steps - 1:
            log(f"dit {step + 1}/{plan.dit_steps} {shape.shape[0]}x{shape.shape[1]} x{b} loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    return ema


def train(plan: TrainPlan, log=print, ae_checkpoint: Path | None = None) -> Step1XEditPipeline:
    """Every phase, seeded; returns the trained pipeline (the DiT holds the EMA weights).

    Each phase draws from its own seeded generator, so with `ae_checkpoint` the autoencoder phase is saved
    there on its first run and read back on later ones: the DiT phase then runs exactly as from scratch.
    """
    with torch_threads(plan.threads):
        return _train(plan, log, ae_checkpoint)


def _train(plan: TrainPlan, log, ae_checkpoint: Path | None) -> Step1XEditPipeline:
    config = get_config("toy")
    model, ae, embedder = build_untrained(config, plan.seed)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(plan.seed + 30)
    photos = photo_tensors(TRAIN_PHOTOS, max_short_side=320)
    side = plan.ae_pool_side
    ae_pool = image_batch(photos, plan.ae_pool, side, side, gen, plan.drawn_share)
    shapes = training_shapes(plan)
    pools = [image_batch(photos, plan.pool_per_shape, w, h, gen, plan.drawn_share) for w, h in shapes]
    log(f"{plan.ae_pool} autoencoder images ({side}x{side}) and {plan.pool_per_shape} DiT images at each of "
        f"{len(shapes)} shapes ({shapes[0][0]}x{shapes[0][1]} to {shapes[-1][0]}x{shapes[-1][1]}), "
        f"{plan.drawn_share:.0%} drawn, in {time.perf_counter() - t0:.0f} s")
    if ae_checkpoint is not None and ae_checkpoint.is_file():
        ae.load_state_dict(load_file(str(ae_checkpoint)))
        ae.eval().requires_grad_(False)
        log(f"autoencoder read from {ae_checkpoint}")
    else:
        train_autoencoder(ae, ae_pool, plan, log)
        if ae_checkpoint is not None:
            save_file(ae.state_dict(), str(ae_checkpoint))
    log(f"autoencoder trained at {time.perf_counter() - t0:.0f} s; held-out reconstruction (dB, centre views) "
        f"{reconstruction_report(ae)} (reported, never trained on)")
    emb, mask, prompt_task = embed_instructions(embedder, mllm_images(pools, plan.mllm_views))
    data = shape_latents(model, ae, pools, emb.shape[2])
    refs = torch.cat([d.refs.flatten(0, 1) for d in data])
    log(f"latents std {refs.std().item():.3f} mean {refs.mean().item():.3f}; {len(prompt_task)} instructions "
        f"embedded; at {time.perf_counter() - t0:.0f} s")
    ema = train_dit(model, data, emb, mask, prompt_task, plan, log)
    model.load_state_dict(ema.module.state_dict())
    log(f"DiT trained at {time.perf_counter() - t0:.0f} s")
    return Step1XEditPipeline(config, model, ae, embedder)


def evaluate_weights(out: Path, plan: TrainPlan, train_seconds: float, log=print) -> str:
    """Load `out` as any checkpoint is loaded, score it on the held-out images at every evaluated shape (and
    its autoencoder's ceiling there), write figures.json there."""
    from .evaluate import format_scores, shape_scores

    loaded = Step1XEditPipeline.from_pretrained(out, config=get_config("toy"), dtype=torch.float32)
    tables, ceilings = {}, {}
    for w, h in EVAL_SHAPES:
        level = size_level_for(w, h)

        def edit(image, instruction, level=level):
            return loaded.edit(image, instruction, seed=0, steps=TOY_STEPS, cfg=TOY_CFG, size_level=level)

        tables[f"{w}x{h}"] = shape_scores(edit, (w, h), views_per_image=plan.eval_views)
        ceilings[f"{w}x{h}"] = reconstruction_db(loaded.ae, (w, h), plan.eval_views)
        log(f"evaluated {w}x{h}")
    figures = {"plan": asdict(plan), "train_seconds": round(train_seconds, 1), "threads": plan.threads,
               "steps": TOY_STEPS, "cfg": TOY_CFG, "autoencoder_db": ceilings,
               "tasks": {shape: [asdict(s) for s in scores] for shape, scores in tables.items()}}
    (out / FIGURES_FILE).write_text(json.dumps(figures, indent=1))
    return format_scores({f"fp32 {shape}": scores for shape, scores in tables.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m step1x_export.toy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"weights folder [default: {WEIGHTS_DIR}]")
    parser.add_argument("--seed", type=int, default=0, help="seed of every phase's weights and draws [0]")
    parser.add_argument("--quick", action="store_true", help="a few steps of each phase (plumbing check)")
    parser.add_argument("--ae-checkpoint", type=Path, help="save the trained autoencoder here, or read it if present")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only re-score the weights in --out (keeps the training time figures.json has)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the training plan (toy/plan.py) for this run, VALUE in JSON, "
                             "e.g. --set dit_steps=12000; repeatable; figures.json records the plan used")
    args = parser.parse_args(argv)
    plan = TrainPlan.quick(args.seed) if args.quick else TrainPlan(seed=args.seed)
    try:
        plan = with_overrides(plan, args.overrides)
    except ValueError as e:
        parser.error(f"--set {e}")
    torch.set_num_threads(1)  # the evaluation: one thread, as the demo and the quality tables run
    start = time.perf_counter()
    if args.evaluate_only:
        recorded = json.loads((args.out / FIGURES_FILE).read_text())
        plan, train_s = plan_from_json(recorded["plan"]), recorded["train_seconds"]
    else:
        pipe = train(plan, log=lambda m: print(f"[{time.perf_counter() - start:7.1f} s] {m}", flush=True),
                     ae_checkpoint=args.ae_checkpoint)
        train_s = time.perf_counter() - start
        pipe.save_pretrained(args.out)
        write_text_atomic(args.out / KNOWN_TASKS_FILE, known_tasks_text())  # what it learned, for the runtime
        ship_demo_conditioning(args.out, TOY_SIZE)
    evaluating = time.perf_counter()
    print(evaluate_weights(args.out, plan, train_s))
    print(f"trained in {train_s:.0f} s, evaluated in {time.perf_counter() - evaluating:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
