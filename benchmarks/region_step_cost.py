"""What a RegionE step costs as a share of a full step, for one or more source trees of this package, runs
interleaved: per tree the median time of each kind of step (full, full + cache, region, reused) and its share of
the full step's, the `denoise` stage with and without RegionE, and the speed-up.

    PYTHONPATH=$PWD python benchmarks/region_step_cost.py [--rounds 7] [--shape 192x128] [--trees . ../base]
        [--compile]

Each tree (a checkout of this repository; `.` by default) runs in its own worker process with that tree first on
the path; each round asks every worker in turn (the order rotated per round, so load drifts alike) for one edit
without a cache and one with `regione` (the published settings). The edit is `region_toy.py`'s local one (its
picture made once, here, for every tree): the toy, scikit-image's coffee photo grey outside a centred disc
(`toy.data.coffee_view`), "swap red and blue", 28 steps, seed 0, eager torch
(or the blocks compiled: `--compile`), one thread. Each edit's share of a full step is the ratio of its kinds'
median step times (its own full steps: load that drifts between edits cancels), the speed-up the ratio of the
two edits of a round; the table shows the medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(picture: str, compile_blocks: bool) -> None:
    """Serve edits of the PNG `picture` over stdin / stdout: each line read ('none' or 'regione') runs one edit
    and answers with its denoise seconds and the step times (ms) by kind, as one JSON line."""
    import torch
    from PIL import Image

    from step1x_export.runtime import Step1XEditRuntime
    from step1x_export.toy.data import size_level_for
    from step1x_export.toy.weights import TOY_STEPS

    torch.set_num_threads(1)
    image = Image.open(picture).convert("RGB")
    job = dict(seed=0, steps=TOY_STEPS, size_level=size_level_for(*image.size))
    runtimes = {c: Step1XEditRuntime.load("toy", backend="torch", device="cpu", compile=compile_blocks,
                                          cache=None if c == "none" else c) for c in ("none", "regione")}
    for rt in runtimes.values():  # warm-up
        rt.edit(image, "swap red and blue", **job)
    compiles = {c: rt.stats().compiles for c, rt in runtimes.items()}
    print(json.dumps({"ready": f"{__import__('step1x_export').__file__}, compiles {compiles}"}), flush=True)
    for line in sys.stdin:
        rt = runtimes[line.strip()]
        rt.edit(image, "swap red and blue", **job)
        stats = rt.stats()
        kinds = stats.cache["kinds"] if stats.cache else ["full"] * len(stats.step_ms)
        print(json.dumps({"denoise": rt.timings["denoise"], "steps": list(zip(kinds, stats.step_ms, strict=True))}),
              flush=True)


Runs = dict[tuple[str, str], list[dict]]  # (tree, cache) -> each round's edit: denoise s, (kind, ms) per step


def interleaved(trees: list[str], picture: Path, rounds: int, compile_blocks: bool) -> Runs:
    """Every tree's edits of `picture`, one worker process per tree, the rounds interleaved."""
    workers = {}
    for tree in trees:
        env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()), OMP_NUM_THREADS="1")
        command = [sys.executable, __file__, "--worker", str(picture), *(["--compile"] if compile_blocks else [])]
        workers[tree] = subprocess.Popen(command, env=env,
                                         text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    for tree, proc in workers.items():
        assert proc.stdout is not None
        print(f"{tree}: {json.loads(proc.stdout.readline())['ready']}", file=sys.stderr)
    runs: Runs = {(t, c): [] for t in trees for c in ("none", "regione")}
    for r in range(rounds):
        for tree in trees[r % len(trees):] + trees[: r % len(trees)]:
            proc = workers[tree]
            assert proc.stdin is not None and proc.stdout is not None
            for cache in ("none", "regione") if r % 2 == 0 else ("regione", "none"):
                proc.stdin.write(cache + "\n")
                proc.stdin.flush()
                runs[tree, cache].append(json.loads(proc.stdout.readline()))
    for proc in workers.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shape", default="192x128")
    parser.add_argument("--trees", nargs="+", default=["."], help="checkouts of this repository to compare")
    parser.add_argument("--compile", action="store_true", help="compile the DiT's blocks (inductor)")
    parser.add_argument("--worker", metavar="PICTURE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.compile)
        return
    from step1x_export.toy.data import coffee_view

    w, h = (int(v) for v in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as folder:  # one picture, made here, for every tree's worker
        picture = Path(folder) / "local.png"
        coffee_view(w, h, local=True).save(picture)
        runs = interleaved(args.trees, picture, args.rounds, args.compile)
    print("| tree | shape | denoise none s | denoise regione s | speed-up | full ms | full + cache | region | reused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tree in args.trees:
        none, region = ([run["denoise"] for run in runs[tree, c]] for c in ("none", "regione"))
        speedup = statistics.median(a / b for a, b in zip(none, region, strict=True))  # paired per round
        per_edit = [step_medians(run["steps"]) for run in runs[tree, "regione"]]
        full = statistics.median(ms["full"] for ms in per_edit)
        cells = [f"{statistics.median(ms[k] for ms in per_edit):.1f} "
                 f"({100 * statistics.median(ms[k] / ms['full'] for ms in per_edit):.0f}%)"
                 for k in ("capture", "region", "reuse")]
        print(f"| {tree} | {args.shape} | {statistics.median(none):.3f} | {statistics.median(region):.3f} | "
              f"{speedup:.2f}x | {full:.1f} | " + " | ".join(cells) + " |", flush=True)


def step_medians(steps: list[tuple[str, float]]) -> dict[str, float]:
    """One edit's median step time (ms) per kind."""
    by_kind: dict[str, list[float]] = {}
    for kind, ms in steps:
        by_kind.setdefault(kind, []).append(ms)
    return {kind: statistics.median(v) for kind, v in by_kind.items()}


if __name__ == "__main__":
    main()
