"""How long `python -m step1x_export.toy.train` will take on this machine, before spending an hour on it: each
phase of the toy's training timed for a few steps at the plan's dims, on the plan's CPU threads, and the
whole run projected from those rates (the held-out evaluation after it, a minute or two, not included).

    PYTHONPATH=$PWD python benchmarks/toy_train_speed.py [--ae-steps 45] [--dit-steps 60]
        [--set FIELD=VALUE ...]

Run it with nothing else on the machine: the rates are what one training run alone gets. It also prints a
hash of the weights after the timed steps; two runs with the same threads on one machine print the same
hash (training is deterministic), another thread count prints another (its sums split differently).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import replace

import torch

from step1x_export.step1x_ref.configs import get_config
from step1x_export.toy.autoencoder_phase import train_autoencoder
from step1x_export.toy.data import TRAIN_PHOTOS, image_batch, photo_tensors
from step1x_export.toy.plan import TrainPlan, training_shapes, with_overrides
from step1x_export.toy.train import build_untrained, embed_instructions, shape_latents, train_dit

MID_SHAPE = (128, 128)  # the shape whose encoding time is scaled by pixels to every training shape


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weights_hash(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for module in modules:
        for tensor in module.state_dict().values():
            h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ae-steps", type=int, default=45, help="autoencoder steps timed [45]")
    p.add_argument("--dit-steps", type=int, default=60, help="DiT steps timed [60]")
    p.add_argument("--mllm-views", type=int, default=2, help="MLLM views timed [2]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="the plan to project, as toy.train's --set, e.g. --set threads=1 [the default plan]")
    args = p.parse_args(argv)
    plan = with_overrides(TrainPlan(), args.overrides)
    torch.set_num_threads(plan.threads)
    model, ae, embedder = build_untrained(get_config("toy"), plan.seed)
    gen = torch.Generator().manual_seed(0)
    photos = photo_tensors(TRAIN_PHOTOS, max_short_side=320)
    ae_pool = image_batch(photos, 64, plan.ae_pool_side, plan.ae_pool_side, gen, plan.drawn_share)
    pool = image_batch(photos, plan.pool_per_shape, *MID_SHAPE, gen, plan.drawn_share)

    ae_s = seconds(lambda: train_autoencoder(ae, ae_pool, replace(plan, ae_steps=args.ae_steps), lambda _: None))
    mllm: list = []
    mllm_s = seconds(lambda: mllm.extend(embed_instructions(embedder, list(pool[: args.mllm_views]))))
    data: list = []
    encode_s = seconds(lambda: data.extend(shape_latents(model, ae, [pool], mllm[0].shape[2])))
    emb, mask, prompt_task = mllm
    dit_s = seconds(lambda: train_dit(model, data, emb, mask, prompt_task, replace(plan, dit_steps=args.dit_steps),
                                      lambda _: None))

    pixels = sum(w * h for w, h in training_shapes(plan)) / (MID_SHAPE[0] * MID_SHAPE[1])
    phases = {
        "autoencoder": (ae_s / args.ae_steps, plan.ae_steps, "s a step"),
        "MLLM": (mllm_s / args.mllm_views, plan.mllm_views, "s a view"),
        "encoding": (encode_s, pixels, f"s for {plan.pool_per_shape} images at {MID_SHAPE[0]}x{MID_SHAPE[1]}"),
        "DiT": (dit_s / args.dit_steps, plan.dit_steps, f"s a step ({MID_SHAPE[0]}x{MID_SHAPE[1]})"),
    }
    total = 0.0
    print(f"{plan.threads} thread(s):")
    for name, (rate, count, unit) in phases.items():
        total += rate * count
        print(f"  {name}: {rate:.3f} {unit}; x {count:g} = {rate * count:.0f} s")
    print(f"projected training: {total:.0f} s ({total / 60:.0f} min) + the evaluation; "
          f"weights hash after the timed steps {weights_hash(ae, model)}")


if __name__ == "__main__":
    main()
