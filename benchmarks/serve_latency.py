"""Latency as clients see it: p50 / p99 of the whole edit and of the time to the first denoising step, at
1, 4, 8 and 16 concurrent clients, on `serve --model toy` with its default settings.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/serve_latency.py --out /tmp/serve_latency.json

One server (the `serve` CLI in a subprocess, loopback only); each client count sends `--per-client` edits
per client (each client sends its next edit when answered), streamed (`stream=true`), so the first
`progress` event times the first step. Prints a Markdown table with the machine's CPU count and load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

from PIL import Image

from step1x_export.serve.load import free_port, run_load, wait_ready

INSTRUCTION = "make it black and white"  # one of the toy's tasks


def photo_png(width: int = 160, height: int = 120) -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--per-client", type=int, default=3, help="edits each client sends, one after another")
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from step1x_export.cli import main; main()", "serve", "--model", "toy",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    png, fields = photo_png(), {"instruction": INSTRUCTION}
    rows = []
    try:
        wait_ready(url)
        run_load(url, png, list(range(args.warm)), clients=1, fields=fields, stream=True)
        for clients in (int(c) for c in args.clients.split(",")):
            seeds = list(range(1000, 1000 + clients * args.per_client))
            report = run_load(url, png, seeds, clients=clients, fields=fields, timeout_s=300, stream=True)
            done = sum(b"event: result" in r.body for r in report.ok)
            rows.append({**report.summary(), "completed": done, "load_avg": [round(x, 2) for x in os.getloadavg()]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"\n{os.cpu_count()} CPUs; `serve --model toy` defaults; {INSTRUCTION!r} on a 160x120 photo, streamed\n")
    print("| clients | edits | p50 s | p99 s | first step p50 s | first step p99 s | edits/s | load avg (1/5/15 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['completed']}/{r['requests']} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
              f"{r['first_step_p50_s']:.2f} | {r['first_step_p99_s']:.2f} | {r['throughput_rps']:.2f} | "
              f"{' / '.join(str(x) for x in r['load_avg'])} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
