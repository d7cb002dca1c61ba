"""The toy edit's denoising time per CPU thread count, on the cores as they are and with other work on them.

    PYTHONPATH=$PWD python benchmarks/toy_threads.py [--threads 1 2] [--rounds 5] [--busy 2]

Interleaved: each round runs every thread count once with the cores as they are ("as is"), then again with
`--busy` busy-looping processes started beside it ("loaded": what another job on a shared machine does), so a
change in the machine's own load between rounds shows in both columns alike. The toy's default edit (the
demo's photo and instruction, size level 160, 28 steps) through `Step1XEditRuntime` on the CPU, with
`RuntimeOptions.threads`; the figure is the runtime's "denoise" stage, median of the rounds. The machine's
1-minute load average is printed before each condition.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from step1x_export.runtime import Step1XEditRuntime
from step1x_export.toy.defaults import DEMO_INSTRUCTION
from step1x_export.toy.demo import demo_photo, edit_resolution
from step1x_export.toy.weights import TOY_SIZE, TOY_STEPS

BUSY_LOOP = "while True: pass"


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """`processes` busy-looping Python processes for the block (each stopped by its own id after)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--busy", type=int, default=2, help="busy processes of the loaded condition")
    args = p.parse_args(argv)
    image = edit_resolution(demo_photo(trained=True)[1], TOY_SIZE)
    runtimes = {n: Step1XEditRuntime.load("toy", device="cpu", threads=n) for n in args.threads}
    for rt in runtimes.values():  # warm: stages loaded, the conditioning computed once
        rt.edit(image, DEMO_INSTRUCTION, seed=0, steps=2)
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for condition, extra in (("as is", 0), ("loaded", args.busy)):
            with busy(extra):
                print(f"round {r + 1} {condition}: load average {load_average():.2f}", flush=True)
                for n, rt in runtimes.items():
                    rt.edit(image, DEMO_INSTRUCTION, seed=0, steps=TOY_STEPS)
                    times.setdefault((condition, n), []).append(rt.timings["denoise"])
    print("| condition | threads | denoise, median s | min..max s |")
    print("|---|---|---|---|")
    for (condition, n), ts in times.items():
        print(f"| {condition} | {n} | {statistics.median(ts):.2f} | {min(ts):.2f}..{max(ts):.2f} |")


if __name__ == "__main__":
    main()
