"""v1.2's speed-ups on one model, interleaved: plain (a DiT call per CFG branch), one masked CFG call, TeaCache
0.2 / 0.4, RegionE (`--regione`), and 4 and 8 clients served one after another or as one batch; each with its
quality against plain (latent and pixel PSNR) and, for a trained model with exact-target tasks (toy-v1.2),
against the exact target.

    python benchmarks/v1p2_speed.py [--model tiny-v1.2 | toy-v1.2] [--steps 28] [--size-level 128] [--rounds 3]

Times are the denoising loop's (`rt.timings["denoise"]`, the DiT's share of an edit) and, for N clients arriving
together, N edits one after another (plain) against one `edit_batch` of the N (`max_batch` = N): edits/s is N
over the whole run's wall time (median over the rounds), and an edit's latency is its client's wait, from the
moment all N arrive to its image being ready (one after another: the edits before it included); p99 is over
every client's latency of every round (linear interpolation). Each round runs every variant once in turn, so a
loaded machine slows them alike.

The edits: random pictures and open instructions for a random-weight model; for a model that learned a few
tasks, the held-out photos and graphics (never trained on) at size_level x size_level, each client a task's
instruction (phrasings cycled). With `--quality-edits N` every single-edit variant first makes the first N
clients' edits once (untimed), and its quality is over those: image PSNR vs plain's (mean and worst), and the
mean PSNR vs the exact targets (plain's own beside it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime.batching import EditJob
from step1x_export.sources import known_tasks

PLAIN = "plain (a call per branch)"
VARIANTS = {  # name -> RuntimeOptions fields over plain v1.2 on this device
    PLAIN: dict(text_bucket=0),
    "one masked CFG call": dict(text_bucket=64),
    "TeaCache 0.2": dict(text_bucket=0, cache="teacache:0.2"),
    "TeaCache 0.4": dict(text_bucket=0, cache="teacache:0.4"),
}
REGIONE = {"RegionE": dict(text_bucket=0, cache="regione")}
PROMPTS = ['Write "OPEN" on the sign', "make the sky orange", "add a red hat", "turn it into a watercolour",
           "remove the car", "make it night", 'Write "SALE" on the window', "add snow on the ground"]
CLIENTS = (4, 8)


@dataclass(frozen=True)
class Client:
    image: Image.Image
    prompt: str
    target: np.ndarray | None  # the exact edit [H, W, 3] uint8, where the model's task has one


def random_clients(count: int) -> list[Client]:
    pictures = [(np.random.default_rng(i).random((96, 128, 3)) * 255).astype(np.uint8) for i in range(count)]
    return [Client(Image.fromarray(p), PROMPTS[i % len(PROMPTS)], None) for i, p in enumerate(pictures)]


def task_clients(count: int, size: int) -> list[Client]:
    """Client i: held-out view i (mod their count) with task i's instruction (tasks in turn, phrasings cycled)."""
    from step1x_export.toy.data import shape_views
    from step1x_export.toy.evaluate import to_pil
    from step1x_export.toy.tasks import GLOBAL_TASKS as TASKS

    _, views = shape_views(size, size)
    clients = []
    for i in range(count):
        task, view = TASKS[i % len(TASKS)], views[i % len(views)]
        target = task.target(view[None])[0].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        clients.append(Client(to_pil(view), task.instructions[(i // len(TASKS)) % len(task.instructions)], target))
    return clients


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float) -> float:
    a, b = (torch.tensor(np.array(x), dtype=torch.float64) for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def serve_one_after_another(rt: Step1XEditRuntime, clients: list[Client], kw: dict) -> tuple[float, list[float], list]:
    """Wall seconds, each client's latency and images for the clients' edits run in turn by `rt.edit`."""
    start = time.perf_counter()
    latencies, images = [], []
    for i, c in enumerate(clients):
        images.append(np.asarray(rt.edit(c.image, c.prompt, seed=i, **kw)))
        latencies.append(time.perf_counter() - start)
    return time.perf_counter() - start, latencies, images


def serve_batched(rt: Step1XEditRuntime, clients: list[Client], kw: dict) -> tuple[float, list[float], list]:
    """Wall seconds, each client's latency (its outcome handed to `done`) and images (client order) for one batch."""
    latencies: list[float] = []
    start = time.perf_counter()
    outcomes = rt.edit_batch([EditJob(c.image, c.prompt, seed=i, **kw) for i, c in enumerate(clients)],
                             done=lambda _: latencies.append(time.perf_counter() - start), max_batch=len(clients))
    wall = time.perf_counter() - start
    by_seed = {o.job.seed: np.asarray(o.image) for o in outcomes}
    return wall, latencies, [by_seed[i] for i in range(len(clients))]


def image_quality(images: list, plain: list, clients: list[Client]) -> str:
    """Image PSNR vs plain's (mean, worst) and, where the clients have exact targets, the mean vs them."""
    vs_plain = [psnr(a, b, 255.0) for a, b in zip(images, plain, strict=True)]
    finite = [v for v in vs_plain if np.isfinite(v)]
    same = len(vs_plain) - len(finite)
    text = ("identical to plain" if not finite else
            f"vs plain: worst {min(vs_plain):.1f} dB, mean {np.mean(finite):.1f} dB"
            + (f" over the {len(finite)} of {len(vs_plain)} not identical" if same else ""))
    if clients[0].target is not None:
        exact = np.mean([psnr(a, c.target, 255.0) for a, c in zip(images, clients, strict=True)])
        text += f"; vs exact target {exact:.2f} dB"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model", default="tiny-v1.2")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size-level", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--regione", action="store_true", help="also time RegionE (cache='regione')")
    parser.add_argument("--quality-edits", type=int, default=0,
                        help="make the first N clients' edits with each single-edit variant for its quality [0: "
                             "client 0's edit of every timed round]")
    args = parser.parse_args()
    kw = dict(steps=args.steps, size_level=args.size_level)
    trained = known_tasks(args.model) is not None
    clients = task_clients(max(CLIENTS), args.size_level) if trained else random_clients(max(CLIENTS))
    variants = {**VARIANTS, **(REGIONE if args.regione else {})}
    runtimes = {name: Step1XEditRuntime.load(args.model, **fields) for name, fields in variants.items()}
    batched = Step1XEditRuntime.load(args.model, max_batch=max(CLIENTS))
    rows = [f"{n} clients, {how}" for n in CLIENTS for how in ("one after another", "batched")]
    times: dict[str, list[float]] = {name: [] for name in [*variants, *rows]}
    latencies: dict[str, list[float]] = {name: [] for name in rows}
    quality: dict[str, str] = {}
    reused: dict[str, list[int]] = {name: [] for name in variants}
    if args.quality_edits:
        probe = clients[: args.quality_edits]
        made = {name: serve_one_after_another(rt, probe, kw)[2] for name, rt in runtimes.items()}
        quality = {name: image_quality(images, made[PLAIN], probe) for name, images in made.items()}
    reference: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    for _ in range(args.rounds):
        for name, rt in runtimes.items():
            out = rt.edit(clients[0].image, clients[0].prompt, seed=0, **kw)
            times[name].append(rt.timings["denoise"])
            if rt.cache_stats:
                reused[name].append(rt.cache_stats.reused)
            if name == PLAIN:
                reference[0] = (rt.last_latent.clone(), np.asarray(out))
            latent, pixels = reference[0]
            if not args.quality_edits:
                quality[name] = (f"latent {psnr(rt.last_latent, latent, float(latent.abs().max())):.1f} dB, "
                                 f"pixels {psnr(out, pixels, 255.0):.1f} dB")
        plain = runtimes[PLAIN]
        for n in CLIENTS:
            serial, batch = f"{n} clients, one after another", f"{n} clients, batched"
            wall, waits, alone = serve_one_after_another(plain, clients[:n], kw)
            times[serial].append(n / wall)
            latencies[serial] += waits
            wall, waits, together = serve_batched(batched, clients[:n], kw)
            times[batch].append(n / wall)
            latencies[batch] += waits
            quality[serial] = image_quality(alone, alone, clients[:n])
            quality[batch] = image_quality(together, alone, clients[:n])
    for name, counts in reused.items():
        if counts:
            quality[name] += f"; {statistics.median(counts):.0f} of {args.steps} steps reused (client 0)"
    print(f"{args.model}, {args.steps} steps, size level {args.size_level}, {args.rounds} rounds interleaved; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | denoise s (median) | edits/s (median) | p99 latency s | quality |")
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
