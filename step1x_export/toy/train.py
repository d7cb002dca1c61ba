"""Train the `toy` model from scratch: autoencoder first, then the DiT and connector, then their fine-tune.

    python -m step1x_export.toy.train [--out DIR] [--seed 0] [--quick] [--first-phase DIR]

The MLLM (the tiny Qwen2.5-VL with our tokenizer) stays as its seeded random initialisation, frozen:
the connector learns to read its hidden states. The autoencoder learns reconstruction on crops of photos and
drawn pictures, its latent pulled towards the whitened principal components of 8x8 patches (a linear code
that already reconstructs the held-out images at ~28 dB: the conv layers start from a good latent instead of
searching for one, which at 8 images a step on one core they did not find in 25 minutes). The DiT learns
rectified flow on the sampler's own shifted timesteps, with the instruction dropped (replaced by "", as the
CFG branch has it) 15% of the time so true CFG works; mirroring, inverting and swapping red and blue are
drawn more often than the other tasks (`TrainPlan.task_weights`). Every DiT step is one shape of the toy's
profile (size levels and aspect ratios up to 2:1 both ways), its batch sized so each step holds about the same
number of tokens. The fine-tune (`tune_phase`) then adds the local task ("make the red things green") and
unknown instructions answered with the unchanged picture, some of its images faded towards grey.
Data: augmented crops of the training photos (`data.TRAIN_PHOTOS`) and pictures drawn here (`drawn`); the
held-out images are used only for the figures printed, never to train. `TrainPlan.threads` CPU threads (two by
default): on one machine, runs with the same thread count are bit-identical; the evaluation always uses one.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import write_text_atomic
from ..instructions import KNOWN_TASKS_FILE
from ..step1x_ref.configs import ModelConfig, get_config
from ..step1x_ref.dit.model import Step1XEdit
from ..step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.vae.autoencoder import AutoEncoder
from ..threads import torch_threads
from .autoencoder_phase import reconstruction_db, reconstruction_report, train_autoencoder
from .data import EVAL_SHAPES, TRAIN_PHOTOS, image_batch, photo_tensors
from .demo import ship_demo_conditioning
from .dit_phase import embed_instructions, first_phase_run, mllm_images, shape_latents, train_dit
from .plan import TrainPlan, plan_from_json, training_shapes, with_overrides
from .tasks import GLOBAL_TASKS, known_tasks_text, trained_tasks
from .tune_phase import fine_tune
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


def train(plan: TrainPlan, log=print, ae_checkpoint: Path | None = None) -> Step1XEditPipeline:
    """Every phase, seeded; returns the trained pipeline (the DiT holds the EMA weights).

    Each phase draws from its own seeded generator, so with `ae_checkpoint` the autoencoder phase is saved
    there on its first run and read back on later ones: the DiT phase then runs exactly as from scratch.
    """
    with torch_threads(plan.threads):
        pipe = _train(plan, log, ae_checkpoint)
        fine_tune(pipe.model, pipe.ae, pipe.embedder, plan, log)
    return pipe


def tune_from(first_phase: Path, plan: TrainPlan, log=print) -> Step1XEditPipeline:
    """The fine-tune alone, from weights the first phase of this plan wrote to `first_phase` (their figures.json
    must record it): the same bits as `train(plan)` on a machine where the first phase gave those weights."""
    recorded = json.loads((first_phase / FIGURES_FILE).read_text())["plan"]
    if plan_from_json(recorded).first_phase() != plan.first_phase():
        raise ValueError(f"{first_phase / FIGURES_FILE}: its weights were made by another first phase than this "
                         f"plan's (recorded {recorded}, expected {plan.first_phase()})")
    config = get_config("toy")
    model, ae, embedder = build_untrained(config, plan.seed)
    made = Step1XEditPipeline.from_pretrained(first_phase, config=config, dtype=torch.float32)
    model.load_state_dict(made.model.state_dict())
    ae.load_state_dict(made.ae.state_dict())
    model.eval().requires_grad_(False)
    ae.eval().requires_grad_(False)
    with torch_threads(plan.threads):
        fine_tune(model, ae, embedder, plan, log)
    return Step1XEditPipeline(config, model, ae, embedder)


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
    emb, mask, prompt_task = embed_instructions(embedder, mllm_images(pools, plan.mllm_views), GLOBAL_TASKS)
    data = shape_latents(model, ae, pools, emb.shape[2], GLOBAL_TASKS)
    refs = torch.cat([d.refs.flatten(0, 1) for d in data])
    log(f"latents std {refs.std().item():.3f} mean {refs.mean().item():.3f}; {len(prompt_task)} instructions "
        f"embedded; at {time.perf_counter() - t0:.0f} s")
    ema = train_dit(model, data, emb, mask, prompt_task, GLOBAL_TASKS, first_phase_run(plan), plan, log)
    model.load_state_dict(ema.module.state_dict())
    log(f"DiT first phase trained at {time.perf_counter() - t0:.0f} s")
    return Step1XEditPipeline(config, model, ae, embedder)


def evaluate_weights(out: Path, plan: TrainPlan, train_seconds: float, log=print) -> str:
    """Load `out` as any checkpoint is loaded, score it on the held-out images at every evaluated shape (and
    its autoencoder's ceiling there), write figures.json there."""
    from .evaluate import answer_figures, format_scores, pipeline_edit, shape_scores

    loaded = Step1XEditPipeline.from_pretrained(out, config=get_config("toy"), dtype=torch.float32)
    edit = pipeline_edit(loaded)
    tables, ceilings = {}, {}
    for w, h in EVAL_SHAPES:
        tables[f"{w}x{h}"] = shape_scores(edit, (w, h), views_per_image=plan.eval_views,
                                            tasks=trained_tasks(plan.tune_steps))
        ceilings[f"{w}x{h}"] = reconstruction_db(loaded.ae, (w, h), plan.eval_views)
        log(f"evaluated {w}x{h}")
    figures = {"plan": asdict(plan), "train_seconds": round(train_seconds, 1), "threads": plan.threads,
               "steps": TOY_STEPS, "cfg": TOY_CFG, "autoencoder_db": ceilings,
               "tasks": {shape: [asdict(s) for s in scores] for shape, scores in tables.items()},
               **answer_figures(edit, plan.eval_views, log)}
    (out / FIGURES_FILE).write_text(json.dumps(figures, indent=1))
    return format_scores({f"fp32 {shape}": scores for shape, scores in tables.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m step1x_export.toy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"weights folder [default: {WEIGHTS_DIR}]")
    parser.add_argument("--seed", type=int, default=0, help="seed of every phase's weights and draws [0]")
    parser.add_argument("--quick", action="store_true", help="a few steps of each phase (plumbing check)")
    parser.add_argument("--ae-checkpoint", type=Path, help="save the trained autoencoder here, or read it if present")
    parser.add_argument("--first-phase", type=Path, metavar="DIR",
                        help="run only the fine-tune, from weights this plan's first phase wrote to DIR (its "
                             "figures.json records that plan and the first phase's seconds)")
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
        log = lambda m: print(f"[{time.perf_counter() - start:7.1f} s] {m}", flush=True)  # noqa: E731
        if args.first_phase is not None:
            pipe = tune_from(args.first_phase, plan, log)
            first_s = json.loads((args.first_phase / FIGURES_FILE).read_text())["train_seconds"]
            train_s = first_s + time.perf_counter() - start
            print(f"first phase recorded {first_s:.0f} s; fine-tune {time.perf_counter() - start:.0f} s")
        else:
            pipe = train(plan, log=log, ae_checkpoint=args.ae_checkpoint)
            train_s = time.perf_counter() - start
        pipe.save_pretrained(args.out)
        # what it learned, for the runtime
        write_text_atomic(args.out / KNOWN_TASKS_FILE, known_tasks_text(trained_tasks(plan.tune_steps)))
        ship_demo_conditioning(args.out, TOY_SIZE)
    evaluating = time.perf_counter()
    print(evaluate_weights(args.out, plan, train_s))
    print(f"trained in {train_s:.0f} s, evaluated in {time.perf_counter() - evaluating:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
