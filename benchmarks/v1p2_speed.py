"""v1.2's speed-ups on one model, interleaved: plain (a DiT call per CFG branch), one masked CFG call, TeaCache
0.2 / 0.4, and batches of 4 clients; each with its quality against plain (latent and pixel PSNR).

    python benchmarks/v1p2_speed.py [--model tiny-v1.2] [--steps 28] [--size-level 128] [--rounds 3]

Times are the denoising loop's (`rt.timings["denoise"]`, the DiT's share of an edit) and, for batches, the
whole `edit_batch` of 4 edits against 4 edits one after another (edits/s). Medians over the rounds, each round
running every variant once in turn, so a loaded machine slows them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime.batching import EditJob

VARIANTS = {  # name -> RuntimeOptions fields over plain v1.2 on this device
    "plain (a call per branch)": dict(text_bucket=0),
    "one masked CFG call": dict(text_bucket=64),
    "TeaCache 0.2": dict(text_bucket=0, cache="teacache:0.2"),
    "TeaCache 0.4": dict(text_bucket=0, cache="teacache:0.4"),
}
PROMPTS = ['Write "OPEN" on the sign', "make the sky orange", "add a red hat", "turn it into a watercolour"]


def photo(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((96, 128, 3)) * 255).astype(np.uint8))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float) -> float:
    a, b = (torch.tensor(np.array(x), dtype=torch.float64) for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-v1.2")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size-level", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kw = dict(steps=args.steps, size_level=args.size_level)
    runtimes = {name: Step1XEditRuntime.load(args.model, **fields) for name, fields in VARIANTS.items()}
    batched = Step1XEditRuntime.load(args.model, max_batch=4)
    times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "4 clients, one after another",
                                                           "4 clients, batched"]}
    quality: dict[str, str] = {}
    reference: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    for _ in range(args.rounds):
        for name, rt in runtimes.items():
            out = rt.edit(photo(0), PROMPTS[0], seed=0, **kw)
            times[name].append(rt.timings["denoise"])
            if name.startswith("plain"):
                reference[0] = (rt.last_latent.clone(), np.asarray(out))
            latent, pixels = reference[0]
            reused = f", {rt.cache_stats.reused}/{args.steps} steps reused" if rt.cache_stats else ""
            quality[name] = (f"latent {psnr(rt.last_latent, latent, float(latent.abs().max())):.1f} dB, "
                             f"pixels {psnr(out, pixels, 255.0):.1f} dB{reused}")
        plain = runtimes["plain (a call per branch)"]
        start = time.perf_counter()
        alone = [np.asarray(plain.edit(photo(i), PROMPTS[i], seed=i, **kw)) for i in range(4)]
        times["4 clients, one after another"].append(4 / (time.perf_counter() - start))
        start = time.perf_counter()
        outcomes = batched.edit_batch([EditJob(photo(i), PROMPTS[i], seed=i, **kw) for i in range(4)])
        times["4 clients, batched"].append(4 / (time.perf_counter() - start))
        by_seed = {o.job.seed: np.asarray(o.image) for o in outcomes}
        quality["4 clients, one after another"] = "plain"
        worst = min(psnr(by_seed[i], alone[i], 255.0) for i in range(4))
        quality["4 clients, batched"] = f"pixels min {worst:.1f} dB vs plain (each = its one-call edit alone)"
    print(f"{args.model}, {args.steps} steps, size level {args.size_level}, {args.rounds} rounds interleaved; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | denoise s (median) | edits/s | quality vs plain |\n|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        speed = f"{med:.2f}" if name.startswith("4 clients") else ""
        seconds = "" if name.startswith("4 clients") else f"{med:.3f}"
        print(f"| {name} | {seconds} | {speed} | {quality[name]} |")


if __name__ == "__main__":
    main()
