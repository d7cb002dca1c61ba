"""Capacity of the edit service: p50/p99 latency and throughput for one process vs N Ray replicas.

    PYTHONPATH=. python benchmarks/serve_capacity.py --requests 64 --clients 8 --steps 2 --size-level 32
    PYTHONPATH=. python benchmarks/serve_capacity.py --model-dir /models/step1x-edit --steps 28 \
        --size-level 1024 --replicas 1,2 --gpus-per-replica 1          # on a machine with 2 GPUs

Each configuration: start the server (the `serve` CLI in a subprocess, or Ray Serve in this process),
wait for /readyz, send `--warm` edits, then `--requests` edits from `--clients` concurrent clients
(loopback only) and report the successful replies' latency percentiles and the throughput. Prints a
Markdown table and writes JSON (--out); the machine's CPU count and load average are part of the record.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from step1x_export.serve.load import free_port, run_load, wait_ready


def measure(url: str, png: bytes, args: argparse.Namespace, label: str) -> dict[str, object]:
    fields = {"instruction": "add a red hat", "steps": str(args.steps), "size_level": str(args.size_level)}
    run_load(url, png, list(range(args.warm)), clients=min(args.clients, max(args.warm, 1)), fields=fields)
    report = run_load(url, png, list(range(1000, 1000 + args.requests)), clients=args.clients, fields=fields,
                      timeout_s=args.timeout)
    return {"server": label, **report.summary(), "failed": len(report.replies) - len(report.ok) + len(report.errors)}


def model_args(args: argparse.Namespace) -> list[str]:
    return ["--model-dir", args.model_dir] if args.model_dir else ["--model", "tiny"]


def single_process(png: bytes, args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    cmd = [sys.executable, "-c", "from step1x_export.cli import main; main()", "serve", *model_args(args),
           "--port", str(port), "--size-level", str(args.size_level), "--max-queue", str(args.requests),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        return measure(f"http://127.0.0.1:{port}", png, args, "1 process")
    finally:
        proc.terminate()
        proc.wait(60)


def ray_replicas(png: bytes, replicas: int, args: argparse.Namespace) -> dict[str, object]:
    import ray
    from ray import serve

    from step1x_export.serve.ray_app import ReplicaPlan, run_ray
    from step1x_export.serve.spec import RuntimeSpec, ServeLimits

    port = free_port()
    source = args.model_dir or "tiny"
    plan = ReplicaPlan(replicas=replicas, gpus_per_replica=args.gpus_per_replica,
                       cpus_per_replica=args.cpus_per_replica)
    limits = ServeLimits(max_queue=args.requests, timeout_s=args.timeout, default_size_level=args.size_level)
    try:
        run_ray(RuntimeSpec(source), limits, plan, host="127.0.0.1", port=port, blocking=False)
        wait_ready(f"http://127.0.0.1:{port}")
        return measure(f"http://127.0.0.1:{port}", png, args, f"Ray, {replicas} replica(s)")
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="official files (default: the tiny random-weight model)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--warm", type=int, default=4, help="edits sent (and not counted) before measuring")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size-level", type=int, default=32)
    p.add_argument("--image-size", default="64x48", help="input image WxH")
    p.add_argument("--replicas", default="1,2", help="Ray replica counts to measure (empty: none)")
    p.add_argument("--no-single", action="store_true", help="skip the single-process server")
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("serve_capacity.json"))
    args = p.parse_args()
    # Ray's workers and the server subprocess import this checkout, as this script does.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                os.environ.get("PYTHONPATH", "")])
    w, h = map(int, args.image_size.split("x"))
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()

    rows = [] if args.no_single else [single_process(png, args)]
    rows += [ray_replicas(png, int(n), args) for n in args.replicas.split(",") if n]
    conditions = {"cpus": os.cpu_count(), "loadavg_1m_after": os.getloadavg()[0], "requests": args.requests,
                  "clients": args.clients, "steps": args.steps, "size_level": args.size_level,
                  "image": args.image_size, "model": args.model_dir or "tiny (random weights)"}
    args.out.write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2))
    print(json.dumps(conditions))
    print("| server | ok/requests | p50 s | p99 s | throughput edits/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['ok']}/{r['requests']} | {r['p50_s']} | {r['p99_s']} | {r['throughput_rps']} |")


if __name__ == "__main__":
    main()
