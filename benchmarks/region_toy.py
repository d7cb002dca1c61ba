"""RegionE vs TeaCache vs no cache on the toy: the `denoise` stage's time (runs interleaved), the image tokens
the DiT computed, PSNR against the uncached edit and against the task's exact target.

    PYTHONPATH=$PWD python benchmarks/region_toy.py [--rounds 3] [--shapes 128x128 192x128] [--every-task]
        [--caches none teacache:0.2 teacache:0.4 regione regione:erode=0] [--quant ARTIFACT] [--compile]

The shipped toy's tasks are all global, but "swap red and blue" leaves grey pixels unchanged: on scikit-image's
coffee photo made grey outside one disc (the cup's region keeps its colour) it is a local edit; the fully
coloured photo with "make it black and white" is a global one; `--every-task` runs every task's first English
phrasing on the full photo. `--exact-partition` prints the tokens RegionE's rule would mark for the local task
"make the red things green" (a task the shipped weights have not learned) if the prediction were its exact
target. Eager torch on the CPU unless `--compile`, fp32 unless `--quant` (a calibration artifact for the toy:
`step1x-export calibrate --model toy --recipe fp8 --out toy-fp8.safetensors`), one thread, the toy's 28 steps,
seed 0; per cache its own runtime, each round running every cache once in turn, the order rotated per round (so
load drifts alike); the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics

from PIL import Image

from step1x_export.calibrate.evaluate import psnr_db
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.toy.data import coffee_view, size_level_for
from step1x_export.toy.demo import task_psnr
from step1x_export.toy.tasks import LOCAL_TASKS, TASKS
from step1x_export.toy.weights import TOY_STEPS

CASES = (("local", "swap red and blue"), ("global", "make it black and white"))


def every_task() -> tuple[tuple[str, str], ...]:
    return tuple(("global", t.english[0]) for t in TASKS)


def exact_partition(width: int, height: int) -> str:
    """The tokens RegionE's rule marks edited on the coffee photo when its prediction is the local task's exact
    target (a perfect model): the least its region phase can run, with the published erosion / dilation and
    without."""
    import dataclasses

    import torch

    from step1x_export.runtime.step.region import edited_tokens
    from step1x_export.runtime.step.region_spec import RegionParams
    from step1x_export.step1x_ref.imaging import pil_to_tensor
    from step1x_export.step1x_ref.sampling import pack
    from step1x_export.toy import small_pipeline

    ae = small_pipeline("toy").ae
    x = pil_to_tensor(coffee_view(width, height))
    with torch.inference_mode():
        ref, target = (pack(ae.encode(v * 2 - 1))[0] for v in (x, LOCAL_TASKS[0].target(x)))
    grid = (height // 16, width // 16)
    params = [dataclasses.replace(RegionParams(), erode=e) for e in (True, False)]
    counts = [len(edited_tokens(target, ref, grid, p)) for p in params]
    return f"{width}x{height}: exact target edits {counts[0]}/{ref.shape[0]} tokens ({counts[1]} without erode)"


def tokens_computed(rt: Step1XEditRuntime) -> tuple[float, float]:
    """Image tokens the DiT ran on, and all its tokens (text too), as shares of the uncached edit's (every step
    on the text, the noisy and the reference tokens)."""
    stats = rt.stats().cache
    if stats is None:
        return 1.0, 1.0
    if "tokens" in stats:
        n, text, steps = stats["image_tokens"], rt.config.embedder.max_length, len(stats["tokens"])
        ran = [t for t, kind in zip(stats["tokens"], stats["kinds"], strict=True) if kind != "reuse"]
        return sum(ran) / (2 * n * steps), sum(t + text for t in ran) / ((2 * n + text) * steps)
    share = stats["computed"] / (stats["computed"] + stats["reused"])
    return share, share


def step_ms_by_kind(rt: Step1XEditRuntime) -> str:
    """RegionE's median step time per kind of step (full, full + cache, region, reuse)."""
    stats = rt.stats()
    if stats.cache is None or "kinds" not in stats.cache:
        return "-"
    by_kind: dict[str, list[float]] = {}
    for ms, kind in zip(stats.step_ms, stats.cache["kinds"], strict=True):
        by_kind.setdefault(kind, []).append(ms)
    return " / ".join(f"{kind} {statistics.median(v):.0f}" for kind, v in by_kind.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every-task", action="store_true", help="every task, not only the local and one global")
    parser.add_argument("--shapes", nargs="+", default=["128x128", "192x128"])
    parser.add_argument("--caches", nargs="+", default=["none", "teacache:0.2", "teacache:0.4", "regione",
                                                         "regione:erode=0"])
    parser.add_argument("--quant", help="a calibration artifact for the toy, applied to every runtime")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT (every runtime)")
    parser.add_argument("--exact-partition", action="store_true",
                        help="only print the local task's partition for its exact target (no timing)")
    args = parser.parse_args()
    import torch

    if args.exact_partition:
        for shape in args.shapes:
            print(exact_partition(*(int(v) for v in shape.split("x"))))
        return

    torch.set_num_threads(1)
    runtimes = {c: Step1XEditRuntime.load("toy", backend="torch", device="cpu", compile=args.compile,
                                          quant=args.quant, cache=None if c == "none" else c) for c in args.caches}
    print("| picture | task | shape | cache | denoise s (median) | speed-up | image tokens computed | all tokens "
          "computed | PSNR vs uncached | PSNR vs target | tokens edited | step ms by kind |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        w, h = (int(v) for v in shape.split("x"))
        for kind, task in every_task() if args.every_task else CASES:
            image = coffee_view(w, h, local=kind == "local")
            times: dict[str, list[float]] = {c: [] for c in args.caches}
            results: dict[str, tuple[Image.Image, tuple[float, float], str, str]] = {}
            for r in range(args.rounds):
                order = list(runtimes)[r % len(runtimes):] + list(runtimes)[: r % len(runtimes)]  # rotated
                for cache in order:
                    rt = runtimes[cache]
                    out = rt.edit(image, task, seed=0, steps=TOY_STEPS, size_level=size_level_for(w, h))
                    times[cache].append(rt.timings["denoise"])
                    stats = rt.stats().cache or {}
                    edited = stats.get("edited", {})
                    share = f"{len(next(iter(edited.values())))}/{stats['image_tokens']}" if edited else "-"
                    results[cache] = (out, tokens_computed(rt), share, step_ms_by_kind(rt))
            plain = results[args.caches[0]][0]
            base = statistics.median(times[args.caches[0]])
            for cache in args.caches:
                out, (image_share, all_share), share, kinds = results[cache]
                scores = task_psnr(image, out, task)
                assert scores is not None
                t = statistics.median(times[cache])
                vs_plain = psnr_db(out, plain)
                print(f"| {kind} | {task} | {shape} | {cache} | {t:.2f} | {base / t:.2f}x | {100 * image_share:.0f}% | "
                      f"{100 * all_share:.0f}% | {'-' if cache == args.caches[0] else f'{vs_plain:.1f} dB'} | "
                      f"{scores[0]:.2f} dB | {share} | {kinds} |", flush=True)
    for rt in runtimes.values():
        rt.close()


if __name__ == "__main__":
    main()
