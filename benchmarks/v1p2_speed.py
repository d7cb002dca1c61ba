"""v1.2's speed-ups on one model, interleaved: plain (a DiT call per CFG branch), one masked CFG call, TeaCache
0.2 / 0.4, and 4 and 8 clients served one after another or as one batch; each with its quality against plain
(latent and pixel PSNR).

    python benchmarks/v1p2_speed.py [--model tiny-v1.2] [--steps 28] [--size-level 128] [--rounds 3]

Times are the denoising loop's (`rt.timings["denoise"]`, the DiT's share of an edit) and, for N clients arriving
together, N edits one after another (plain) against one `edit_batch` of the N (`max_batch` = N): edits/s is N
over the whole run's wall time (median over the rounds), and an edit's latency is its client's wait, from the
moment all N arrive to its image being ready (one after another: the edits before it included); p99 is over
every client's latency of every round (linear interpolation). Each round runs every variant once in turn, so a
loaded machine slows them alike.
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
PROMPTS = ['Write "OPEN" on the sign', "make the sky orange", "add a red hat", "turn it into a watercolour",
           "remove the car", "make it night", 'Write "SALE" on the window', "add snow on the ground"]
CLIENTS = (4, 8)


def photo(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((96, 128, 3)) * 255).astype(np.uint8))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float) -> float:
    a, b = (torch.tensor(np.array(x), dtype=torch.float64) for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def serve_one_after_another(rt: Step1XEditRuntime, clients: int, kw: dict) -> tuple[float, list[float], list]:
    """Wall seconds, each client's latency and images for `clients` edits run in turn by `rt.edit`."""
    start = time.perf_counter()
    latencies, images = [], []
    for i in range(clients):
        images.append(np.asarray(rt.edit(photo(i), PROMPTS[i], seed=i, **kw)))
        latencies.append(time.perf_counter() - start)
    return time.perf_counter() - start, latencies, images


def serve_batched(rt: Step1XEditRuntime, clients: int, kw: dict) -> tuple[float, list[float], dict]:
    """Wall seconds, each client's latency (its outcome handed to `done`) and images by seed for one batch."""
    latencies: list[float] = []
    start = time.perf_counter()
    outcomes = rt.edit_batch([EditJob(photo(i), PROMPTS[i], seed=i, **kw) for i in range(clients)],
                             done=lambda _: latencies.append(time.perf_counter() - start), max_batch=clients)
    wall = time.perf_counter() - start
    return wall, latencies, {o.job.seed: np.asarray(o.image) for o in outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model", default="tiny-v1.2")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size-level", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kw = dict(steps=args.steps, size_level=args.size_level)
    runtimes = {name: Step1XEditRuntime.load(args.model, **fields) for name, fields in VARIANTS.items()}
    batched = Step1XEditRuntime.load(args.model, max_batch=max(CLIENTS))
    rows = [f"{n} clients, {how}" for n in CLIENTS for how in ("one after another", "batched")]
    times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, *rows]}
    latencies: dict[str, list[float]] = {name: [] for name in rows}
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
        for n in CLIENTS:
            serial, batch = f"{n} clients, one after another", f"{n} clients, batched"
            wall, waits, alone = serve_one_after_another(plain, n, kw)
            times[serial].append(n / wall)
            latencies[serial] += waits
            wall, waits, by_seed = serve_batched(batched, n, kw)
            times[batch].append(n / wall)
            latencies[batch] += waits
            quality[serial] = "plain"
            worst = min(psnr(by_seed[i], alone[i], 255.0) for i in range(n))
            quality[batch] = f"pixels min {worst:.1f} dB vs plain (each = its one-call edit alone)"
    print(f"{args.model}, {args.steps} steps, size level {args.size_level}, {args.rounds} rounds interleaved; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | denoise s (median) | edits/s (median) | p99 latency s | quality vs plain |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        served = name in latencies
        seconds = "" if served else f"{med:.3f}"
        speed = f"{med:.2f}" if served else ""
        p99 = f"{np.percentile(latencies[name], 99):.2f}" if served else ""
        print(f"| {name} | {seconds} | {speed} | {p99} | {quality[name]} |")


if __name__ == "__main__":
    main()
