"""1 GPU vs N GPUs for one edit's denoising, and TeaCache's skips, on the full-size DiT with random weights.

Run under torchrun, one process per GPU (`device_parallel.sh` does): every rank first times the
single-process loop on its own GPU (the 1-way baseline), then every parallel layout whose degrees
multiply to N, then TeaCache at each threshold in one process and on the largest layout. The loop
is the runtime's (`sampling.denoise` over `guided_euler` of a torch engine or of `CachedStep`), eager
(no compile, no CUDA graphs) in every row, so the rows differ only in the layout and the cache.
Reports seconds per denoise (median of --runs), speedup vs 1-way, peak memory per GPU, the latent's
relative error vs 1-way, DiT calls computed / reused and latent PSNR vs no cache. JSON in --out-dir.

    CPU dry run: NPROC=2 OUT=/tmp/dp bash benchmarks/device_parallel.sh --model tiny --device cpu --size 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from step1x_export.bench.ladder import psnr, rel_err
from step1x_export.bench.measure import peak_memory_gb, reset_peak_memory, short_error, synchronize
from step1x_export.bench.models import DiTInputs, build_dit, dit_inputs
from step1x_export.files import atomic_path
from step1x_export.runtime.engines.torch_engine import TorchEngine
from step1x_export.runtime.parallel.dit import ParallelDiT
from step1x_export.runtime.parallel.layout import ParallelDegrees, init_groups, rank_device
from step1x_export.runtime.step.caching import CachedStep, CacheSpec
from step1x_export.runtime.step.engine_step import engine_step_fn
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.sampling import denoise, guided_euler

# (cfg, ulysses, ring) layouts tried for each world size, upstream's and xDiT's usual ones first
LAYOUTS = {
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    4: [(2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (1, 1, 4)],
    8: [(2, 4, 1), (2, 2, 2), (1, 8, 1), (2, 1, 4)],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="v1.1", help="config name (v1.1 full size; tiny for a CPU dry run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--size", type=int, default=1024, help="square edit size in pixels")
    p.add_argument("--steps", type=int, default=28, help="denoising steps per timed edit")
    p.add_argument("--runs", type=int, default=1, help="timed edits per row (median)")
    p.add_argument("--thresholds", default="0.2,0.4,0.6", help="TeaCache thresholds")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "device_parallel_out")))
    return p.parse_args()


def timed_denoise(step_fn, inputs: DiTInputs, runs: int, device: torch.device,
                  begin=None) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `runs` denoising loops (after one 2-step warm-up) and the last latent."""
    update = guided_euler(step_fn)

    def once(timesteps: list[float]) -> torch.Tensor:
        if begin is not None:
            begin(len(timesteps) - 1)
        return denoise(update, inputs.noise, inputs.ref, timesteps, guidance=6.0, truncate=0.93,
                       conditioning=(inputs.pe, inputs.llm_embedding, inputs.llm_mask))

    once(inputs.timesteps[:3])
    seconds = []
    for _ in range(runs):
        synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        latent = once(inputs.timesteps)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds, latent


def row(name: str, world: int, seconds: list[float], latent, ref, device, stats=None, uncached=None) -> dict:
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_memory_gb(device))
    out = {"row": name, "gpus": world, "s_per_edit": statistics.median(seconds), "runs": seconds,
           "rel_err_vs_1way": rel_err(latent, ref) if ref is not None else 0.0,
           "peak_gb_per_gpu": peaks[:world]}
    if stats is not None:
        out |= {"computed": stats.computed, "reused": stats.reused,
                "latent_psnr_vs_no_cache": psnr(latent, uncached)}
    return out


def main() -> None:
    args = parse_args()
    device = rank_device(torch.device(args.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    leader = rank == 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = get_config(args.model)
    model = build_dit(config, device, dtype)
    inputs = dit_inputs(config, args.size, args.steps, device)
    inputs.llm_embedding = inputs.llm_embedding.to(dtype)
    spec = dit_spec(config)
    rows: list[dict] = []
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "world": world, "model": args.model, "dtype": args.dtype, "size": args.size, "steps": args.steps,
           "weights": "random", "mode": "eager (no compile, no CUDA graphs)"}

    def report(r: dict) -> None:
        rows.append(r)
        if leader:
            print(json.dumps(r), flush=True)
            args.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.out_dir / "device_parallel.json") as tmp:
                tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1))

    single = TorchEngine(model, spec, dtype, device)
    reset_peak_memory(device)
    seconds, ref = timed_denoise(engine_step_fn(single), inputs, args.runs, device)
    report(row("1-way", 1, seconds, ref, None, device))
    base = rows[0]["s_per_edit"]
    for cfg, uly, ring in LAYOUTS.get(world, []) if world > 1 else []:
        degrees = ParallelDegrees(cfg=cfg, ulysses=uly, ring=ring)
        try:
            engine = TorchEngine(ParallelDiT(model, init_groups(degrees, device)), spec, dtype, device)
            reset_peak_memory(device)
            seconds, latent = timed_denoise(engine_step_fn(engine), inputs, args.runs, device)
            r = row(str(degrees), world, seconds, latent, ref, device)
            report(r | {"speedup": base / r["s_per_edit"]})
        except Exception as err:  # one failed layout is a row, not the end of an unattended run
            report({"row": str(degrees), "error": short_error(err)})
    cached_layouts = [(1, 1, 1), *LAYOUTS.get(world, [])[:1]]  # one GPU, and the first N-way layout
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        for layout in cached_layouts:
            degrees = ParallelDegrees(*layout)
            try:
                module = model if degrees.world == 1 else ParallelDiT(model, init_groups(degrees, device))
                step = CachedStep(TorchEngine(module, spec, dtype, device), CacheSpec("teacache", threshold))
                reset_peak_memory(device)
                seconds, latent = timed_denoise(step, inputs, args.runs, device, begin=step.begin)
                name = f"teacache:{threshold:g} {degrees}"
                r = row(name, degrees.world, seconds, latent, ref, device, step.stats, ref)
                report(r | {"speedup": base / r["s_per_edit"]})
            except Exception as err:
                report({"row": f"teacache:{threshold:g} {degrees}", "error": short_error(err)})
    if leader:
        print(table(env, rows))
    dist.destroy_process_group()


def table(env: dict, rows: list[dict]) -> str:
    head = (f"{'row':34} {'GPUs':>4} {'s/edit':>8} {'speedup':>8} {'rel err vs 1-way':>17} {'calls c/r':>9} "
            f"{'PSNR dB':>8} peak GB/GPU")
    lines = [" ".join(f"{k}={v}" for k, v in env.items()), head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:34} FAILED {r['error']}")
            continue
        calls = f"{r['computed']}/{r['reused']}" if "computed" in r else "-"
        p = r.get("latent_psnr_vs_no_cache")
        p = "-" if p is None else ("inf" if math.isinf(p) else f"{p:.1f}")
        peaks = ",".join("-" if g is None else f"{g:.1f}" for g in r["peak_gb_per_gpu"])
        lines.append(f"{r['row']:34} {r['gpus']:>4} {r['s_per_edit']:>8.2f} {r.get('speedup', 1.0):>8.2f} "
                     f"{r['rel_err_vs_1way']:>17.2e} {calls:>9} {p:>8} {peaks}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
