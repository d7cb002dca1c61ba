"""Load test of step-level batching: `serve --max-batch 1` vs batched, 8 and 16 clients, toy and tiny models.

    PYTHONPATH=. python benchmarks/serve_batching.py                       # the table in docs/serving.md
    PYTHONPATH=. python benchmarks/serve_batching.py --models toy --batches 1,8 --clients 8 --requests 64

For each model, one `serve` process per --max-batch (its CLI, in a subprocess, --threads torch threads) is
started and warmed; then --requests edits from 8 and from 16 concurrent clients (each sends its next request
when answered; loopback only), --repeats times, alternating between the servers run by run so that a drift
in the machine's load falls on every setting alike. Reported per run: answers by status (503s are the
deadline rule's refusals), throughput, p50 / p99 latency of the successful answers, the machine's 1-minute
load average (sampled every 0.5 s during the run: mean and max), and whether every answer equals its
seed's serial edit (run in this process on the same model: a batched edit is bit for bit the edit alone,
tests/test_batching.py; an answer more than one 8-bit level off is listed), with the largest level difference
seen. Prints a Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from step1x_export.serve.load import free_port, run_load, wait_ready
from step1x_export.step1x_ref.configs import get_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from step1x_export.cli import main; main()"]
# toy: its own steps and CFG, 64x64 edits; tiny: a short edit at its smallest useful size
SETTINGS = {"tiny": {"steps": 4, "cfg": 6.0, "size_level": 32},
            "toy": {"steps": 28, "cfg": get_config("toy").default_cfg, "size_level": 64}}


class LoadAverage:
    """Samples the 1-minute load average every `period` seconds while running (a `with` block)."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples = period, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadAverage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def input_png() -> tuple[bytes, Image.Image]:
    image = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), image


def serial_reference(model: str, image: Image.Image, seeds: list[int], fields: dict[str, str]) -> dict[int, np.ndarray]:
    import torch

    from step1x_export.runtime import Step1XEditRuntime

    torch.set_num_threads(1)
    with Step1XEditRuntime.load(model) as rt:
        return {s: np.asarray(rt.edit(image, fields["instruction"], seed=s, steps=int(fields["steps"]),
                                      cfg=float(fields["cfg"]), size_level=int(fields["size_level"])))
                for s in seeds}


def start_server(model: str, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [*CLI, "serve", "--model", model, "--port", str(port), "--max-batch", str(max_batch),
           f"--{args.batching}-batch", "--size-level", str(SETTINGS[model]["size_level"]), "--timeout",
           str(args.timeout), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return proc, url


def one_run(url: str, png: bytes, fields: dict[str, str], clients: int, args: argparse.Namespace,
            reference: dict[int, np.ndarray]) -> dict[str, object]:
    seeds = list(range(args.requests))
    with LoadAverage() as load:
        report = run_load(url, png, seeds, clients=clients, fields=fields, timeout_s=args.timeout + 30)
    statuses: dict[str, int] = {}
    for r in report.replies:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    levels = {r.seed: int(np.abs(np.asarray(Image.open(io.BytesIO(r.body)).convert("RGB")).astype(int)
                                 - reference[r.seed].astype(int)).max()) for r in report.ok}
    mismatched = [seed for seed, level in levels.items() if level > 1]
    return {**report.summary(), "statuses": statuses, "refused_503": statuses.get("503", 0),
            "transport_errors": len(report.errors), "mismatched": mismatched,
            "max_level_diff": max(levels.values(), default=0),
            "loadavg_mean": round(statistics.fmean(load.samples), 2), "loadavg_max": round(max(load.samples), 2)}


def step_times(models: list[str], batches: list[int], repeats: int = 30) -> None:
    """In-process: one denoising step (DiT + CFG + Euler) of b edits at each batch size, timed in thread CPU
    time (the machine is shared: wall time would count other jobs), median of `repeats`, alternating between the
    runtime's exact step (each Linear, GELU and SiLU lane by lane: every edit bit for bit its edit alone) and the
    same step with plain batched GEMMs (what exactness costs); per edit = per step / b."""
    import torch

    from step1x_export.runtime import Step1XEditRuntime
    from step1x_export.runtime.batching import EditJob
    from step1x_export.runtime.step.engine_step import engine_step_fn
    from step1x_export.step1x_ref.sampling import Batch, guided_euler

    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    for model in models:
        level = SETTINGS[model]["size_level"]
        with Step1XEditRuntime.load(model, max_batch=max(batches)) as rt:
            lanes = [rt.prepare_lane(EditJob(input_png()[1], "x", seed=i, steps=4, size_level=level))
                     for i in range(max(batches))]
            updates = {"exact": rt.batch_update(), "batched GEMMs": guided_euler(engine_step_fn(rt.stages.load("dit")))}
            for b in batches:
                batch = Batch(lanes[:b], b)
                args = (*batch.step_inputs(), *batch.conditioning)
                seconds: dict[str, list[float]] = {name: [] for name in updates}
                for _ in range(repeats + 2):
                    for name, update in updates.items():
                        t0 = time.thread_time()
                        update(*args)
                        seconds[name].append(time.thread_time() - t0)
                medians = {name: statistics.median(s[2:]) for name, s in seconds.items()}
                print(f"{model} batch {b}: " + ", ".join(f"{name} {1000 * m:.1f} ms per step, {1000 * m / b:.2f} ms "
                                                         "per edit" for name, m in medians.items()))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="toy,tiny")
    p.add_argument("--batches", default="1,4", help="--max-batch values to compare")
    p.add_argument("--batching", choices=("fixed", "adaptive"), default="fixed",
                   help="the servers' batch policy: fixed (up to --max-batch always: what batching does) or adaptive "
                        "(serve's default: the measured batch size with the most steps per second)")
    p.add_argument("--clients", default="8,16")
    p.add_argument("--requests", type=int, default=32, help="edits per run")
    p.add_argument("--warm", type=int, default=4, help="edits sent (and not counted) after /readyz")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating between the servers")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=float, default=300.0, help="the server's --timeout (its default)")
    p.add_argument("--out", type=Path, default=Path("serve_batching.json"))
    p.add_argument("--step-times", action="store_true",
                   help="only the in-process step time per batch size, exact and with batched GEMMs")
    args = p.parse_args()
    if args.step_times:
        return step_times(args.models.split(","), sorted({1, *map(int, args.batches.split(","))}))
    png, image = input_png()
    rows = []
    for model in args.models.split(","):
        fields = {"instruction": "add a red hat", **{k: str(v) for k, v in SETTINGS[model].items()}}
        reference = serial_reference(model, image, list(range(args.requests)), fields)
        servers = {b: start_server(model, b, args) for b in map(int, args.batches.split(","))}
        try:
            for _, url in servers.values():
                run_load(url, png, list(range(10_000, 10_000 + args.warm)), clients=args.warm, fields=fields)
            # Settings alternate run by run, so a change in the machine's load falls on all of them alike.
            for clients in map(int, args.clients.split(",")):
                for repeat in range(args.repeats):
                    for max_batch, (_, url) in servers.items():
                        row = {"model": model, "max_batch": max_batch, "repeat": repeat, **fields,
                               **one_run(url, png, fields, clients, args, reference)}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
    conditions = {"cpus": os.cpu_count(), "threads": args.threads, "requests": args.requests,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2))
    print(json.dumps(conditions))
    print("| model | steps | --max-batch | clients | run | ok / 503 / other | throughput edits/s | p50 s | p99 s | "
          "load avg mean (max) | answers = serial (max level diff) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        other = r["requests"] - r["ok"] - r["refused_503"]
        print(f"| {r['model']} | {r['steps']} | {r['max_batch']} | {r['clients']} | {r['repeat'] + 1} | {r['ok']} / "
              f"{r['refused_503']} / "
              f"{other} | {r['throughput_rps']} | {r['p50_s']} | {r['p99_s']} | {r['loadavg_mean']} "
              f"({r['loadavg_max']}) | {'yes' if not r['mismatched'] else r['mismatched']} ({r['max_level_diff']}) |")


if __name__ == "__main__":
    main()
