"""The GPU checks of issues 3, 4 and 5, in one device call (under 8 minutes on an H100 / H200).

    OUT=/some/dir bash benchmarks/device_checks.sh                     # what the device tool runs
    OUT=/tmp/dc bash benchmarks/device_checks.sh --model tiny --device cpu   # CPU dry run, well under a minute

- issue 5 (runtime): full-size DiT, random bf16 weights built on the GPU; at each size, `denoise` over
  `guided_euler(engine_step_fn(TorchEngine))` eager vs the same update in `CudaGraphed` (final-latent
  difference after K steps, median ms/step); peak memory of a whole edit through `Step1XEditRuntime`.
- issue 4 (quantization): one Linear's FP8 (`_scaled_mm`) / INT8 (`_int_mm`) kernel vs its emulation, per
  channel and per tensor; one DiT step in bf16 vs FP8 vs INT8 (artifact from the stats of one eager step).
- issue 3 (export): the full-width DiT cut to 2 double + 2 single blocks (connector full) exported to ONNX
  fp32 with `export_graph`, ORT (CPU provider) vs torch fp32 on the same inputs.

Every entry is in try/except (a failure is a row, not the end of the run), `$OUT/device_checks.json` is
rewritten after each one, entries that would start past `--budget-s` are skipped, the table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from step1x_export.bench.environment import environment_info, header_lines
from step1x_export.bench.ladder import max_rel_err, rel_err, timed_calls
from step1x_export.bench.measure import measure, short_error
from step1x_export.bench.models import (
    QWEN25_VL_7B_TEXT,
    QWEN25_VL_7B_VISION,
    DiTInputs,
    activation_check,
    build_dit,
    build_vae,
    default_dtype,
    dit_inputs,
)
from step1x_export.bench.report import write_text_atomic
from step1x_export.calibrate.apply import quantize_model
from step1x_export.calibrate.collect import InputStats, StatsCollector
from step1x_export.calibrate.qlinear import Kernel, QuantLinear
from step1x_export.calibrate.recipes import RECIPES, build_artifact, layer_scales
from step1x_export.specs import dit_spec, vae_decoder_spec, vae_encoder_spec
from step1x_export.step1x_ref.autoencoder import VAEDecoder, VAEEncoder
from step1x_export.step1x_ref.configs import ModelConfig, get_config
from step1x_export.step1x_ref.sampling import denoise, guided_euler
from step1x_export.timing import StageTimer

SKIP_CUDA = "skipped: needs CUDA"
LAYER = "single_blocks.0.linear1"  # the widest GEMM of the DiT (hidden -> 3 * hidden + mlp): the kernel check's layer
GUIDANCE = 6.0


# -- bookkeeping ----------------------------------------------------------------------------------
class Report:
    """Entries {name, status, elapsed_s, ...figures}, saved atomically after each one."""

    def __init__(self, path: Path, env: dict[str, str], config: dict[str, Any], start: float, budget_s: float):
        self.path, self.start, self.budget_s = path, start, budget_s
        self.data: dict[str, Any] = {"env": env, "config": config, "entries": [], "notes": []}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 0.0) -> dict[str, Any]:
        """Run one entry unless fewer than `need_s` seconds of the budget are left; record and save it."""
        entry: dict[str, Any] = {"name": name}
        if self.left_s() < need_s:
            entry["status"] = f"skipped: budget ({self.left_s():.0f} s left, needs ~{need_s:.0f} s)"
        else:
            log(f"{name} ...", self.start)
            t0 = time.monotonic()
            try:
                entry.update(fn())
                entry.setdefault("status", "ok")
            except Exception as err:  # one failure must not cost the whole device call
                traceback.print_exc()
                entry["status"], entry["error"] = "failed", short_error(err)
            entry["elapsed_s"] = round(time.monotonic() - t0, 2)
        log(f"{name}: {entry['status']}", self.start)
        self.data["entries"].append(entry)
        self.save()
        return entry

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, default=_jsonable))


def _jsonable(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype | torch.device | Path):
        return str(value)
    return repr(value)


def log(msg: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- issue 5: CUDA graphs and the whole edit --------------------------------------------------------
def _ms(timers: list[StageTimer]) -> list[float]:
    """Milliseconds of each call timed by `timed_calls` (one sync for the lot on a GPU)."""
    return [1000 * t.resolve()["step"] for t in timers]


def run_denoise(update: Callable[..., Tensor], x: DiTInputs, config: ModelConfig, steps: int | None = None) -> Tensor:
    timesteps = x.timesteps if steps is None else x.timesteps[: steps + 1]
    with torch.inference_mode():
        return denoise(update, x.noise, x.ref, timesteps, guidance=GUIDANCE, truncate=config.cfg_truncate,
                       conditioning=(x.pe, x.llm_embedding, x.llm_mask))


def graphs_check(dit: nn.Module, config: ModelConfig, x: DiTInputs, dtype: torch.dtype,
                 device: torch.device) -> dict[str, Any]:
    """Eager vs CUDA-graphed `denoise` over the same update: final-latent difference and median ms/step."""
    from step1x_export.runtime.cudagraph import CudaGraphed
    from step1x_export.runtime.step import engine_step_fn
    from step1x_export.runtime.torch_engine import TorchEngine

    out: dict[str, Any] = {"size": x.size, "tokens": x.tokens, "steps": len(x.timesteps) - 1}
    out["activations"] = activation_check(dit, x, dtype)
    update = guided_euler(engine_step_fn(TorchEngine(dit, dit_spec(config), dtype, device)))
    run_denoise(update, x, config, steps=1)  # warm-up: cuBLAS handles, allocator
    eager_timers: list[StageTimer] = []
    eager = run_denoise(timed_calls(update, device, eager_timers), x, config)
    out["eager_ms_step"] = statistics.median(_ms(eager_timers))

    cuda = device.type == "cuda"
    graphed = CudaGraphed(update, enabled=cuda)
    capture_timers: list[StageTimer] = []
    graph_timers: list[StageTimer] = []
    run_denoise(timed_calls(graphed, device, capture_timers), x, config)  # the first call warms up and captures
    replayed = run_denoise(timed_calls(graphed, device, graph_timers), x, config)
    out["graph_first_call_ms"] = _ms(capture_timers)[0]
    out["graph_ms_step"] = statistics.median(_ms(graph_timers))
    out["speedup"] = out["eager_ms_step"] / out["graph_ms_step"]
    out["max_abs_diff"] = float((replayed.float() - eager.float()).abs().max())
    out["rel_diff"] = rel_err(replayed.float(), eager.float())
    out["latent_rms"] = float(eager.float().pow(2).mean().sqrt())
    if not cuda:  # the wrapper's bookkeeping ran eagerly: the figures above compare eager with eager
        out["status"] = f"{SKIP_CUDA} (graph wrapper ran eagerly)"
    elif not out["activations"]["ok"]:
        out["status"] = "ok (activations NOT healthy: timings suspect)"
    return out


class StubEncoder:
    """Stands in for the MLLM when it is not built: MLLM-shaped random conditioning, 120 / 100 kept tokens."""

    def __init__(self, config: ModelConfig, device: torch.device):
        x = dit_inputs(config, 32, 1, device)
        self.emb, self.mask = x.llm_embedding, x.llm_mask

    def __call__(self, instructions: list[str], image: Image.Image) -> tuple[Tensor, Tensor]:
        return self.emb, self.mask

    def close(self) -> None:
        self.emb = self.mask = None


def build_mllm_7b(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Qwen2.5-VL-7B's shape with random weights, driven by the tiny (code-built) tokenizer + processor.

    No tokenizer can be downloaded: the tiny one's special-token ids go into the 7B config (ids only,
    the shapes stay 7B's), so the real `Qwen25VLEmbedder.forward` runs end to end.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from step1x_export.step1x_ref.conditioner import Qwen25VLEmbedder
    from step1x_export.step1x_ref.tiny_qwen import build_tiny_processor

    if config.tiny_qwen is not None:
        return Qwen25VLEmbedder.tiny(config.tiny_qwen, config.embedder, seed=2, dtype=dtype).to(device)
    processor = build_tiny_processor(config.embedder.min_pixels, config.embedder.max_pixels)
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(QWEN25_VL_7B_TEXT, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    hf_config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN25_VL_7B_VISION), **ids)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(2)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    return Qwen25VLEmbedder(model.eval(), processor, config.embedder)


def edit_peak_check(dit: nn.Module, config: ModelConfig, size: int, steps: int, dtype: torch.dtype,
                    device: torch.device, with_mllm: bool) -> dict[str, Any]:
    """Peak GPU memory of one whole edit through `Step1XEditRuntime` (graphs on, no compile), all stages resident."""
    from step1x_export.runtime.options import RuntimeOptions
    from step1x_export.runtime.runtime import DTYPE_PRECISION, Step1XEditRuntime
    from step1x_export.runtime.torch_engine import TorchEncoder, TorchEngine

    out: dict[str, Any] = {"size": size, "steps": steps}
    ae = build_vae(config, device, torch.float32, seed=1)  # the runtime's VAE runs in fp32, as upstream
    encoder: Any = None
    if with_mllm:
        try:
            encoder = TorchEncoder(build_mllm_7b(config, device, dtype))
            shape = "tiny Qwen2.5-VL" if config.tiny_qwen is not None else "Qwen2.5-VL-7B shape"
            out["mllm"] = f"included ({shape}, random weights, code-built tokenizer)"
        except Exception as err:  # the DiT + VAE peak is still worth having
            traceback.print_exc()
            out["mllm"] = f"NOT included: build failed ({short_error(err)})"
            free(device)
    else:
        out["mllm"] = "NOT included (--no-mllm)"
    if encoder is None:
        encoder = StubEncoder(config, device)
    loaders = {
        "encoder": lambda: encoder,
        "vae_encoder": lambda: TorchEngine(VAEEncoder(ae), vae_encoder_spec(config), torch.float32, device),
        "dit": lambda: TorchEngine(dit, dit_spec(config), dtype, device),
        "vae_decoder": lambda: TorchEngine(VAEDecoder(ae), vae_decoder_spec(config), torch.float32, device),
    }
    options = RuntimeOptions(precision=DTYPE_PRECISION[dtype], cuda_graphs=True, compile=False)
    image = _test_image(size)
    runtime = Step1XEditRuntime(config, loaders, options, device)
    try:
        t0 = time.perf_counter()
        result = runtime.edit(image, "make the sky blue", seed=0, steps=steps, size_level=size)
        out["wall_s"] = time.perf_counter() - t0  # includes the graph capture of the first step
        out["output_size"] = list(result.size)
        out["peak_mem_gb"] = None if runtime.peak_memory.bytes is None else runtime.peak_memory.bytes / 1e9
        out["peak_mem_counter"] = runtime.peak_memory.what
        out["stage_s"] = runtime.timings
        out["cuda_graphs"] = runtime.options.cuda_graphs
    finally:
        runtime.close()  # frees the engines; the DiT stays with the caller
        loaders.clear()
        free(device)
    return out


def _test_image(size: int) -> Image.Image:
    ramp = torch.linspace(0, 255, size).to(torch.uint8)
    rgb = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                       torch.full((size, size), 128, dtype=torch.uint8)], dim=-1)
    return Image.fromarray(rgb.numpy())


def issue5(report: Report, config: ModelConfig, args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype) -> None:
    holder: dict[str, nn.Module] = {}

    def build() -> dict[str, Any]:
        t0 = time.perf_counter()
        holder["dit"] = build_dit(config, device, dtype, seed=0)
        params = sum(p.numel() for p in holder["dit"].parameters())
        return {"params_m": params / 1e6, "build_s": time.perf_counter() - t0}

    if report.run("5.build_dit", build, need_s=30 * args.scale)["status"] != "ok":
        return
    for size in args.sizes:
        x = dit_inputs(config, size, args.steps, device)
        report.run(f"5.graphs@{size}", lambda x=x: graphs_check(holder["dit"], config, x, dtype, device),
                   need_s=(15 if size <= 512 else 30) * args.scale)
        free(device)
    if args.edit_size:
        report.run(f"5.edit_peak@{args.edit_size}",
                   lambda: edit_peak_check(holder["dit"], config, args.edit_size, args.edit_steps, dtype, device,
                                           with_mllm=not args.no_mllm),
                   need_s=60 * args.scale)
    holder.clear()
    free(device)


# -- issue 4: quantized kernels and quantized steps -------------------------------------------------
def layer_kernel_check(linear: nn.Linear, x: Tensor, device: torch.device) -> dict[str, Any]:
    """FP8 / INT8 GEMM kernel vs the emulation of the same QuantLinear (and both vs the float Linear)."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = F.linear(x, linear.weight.float(), None if linear.bias is None else linear.bias.float())
    stats = InputStats(x.abs().amax(dim=0))
    rows: list[dict[str, Any]] = []
    for recipe_name in ("fp8", "int8-sq"):
        recipe = RECIPES[recipe_name]
        for per_channel in (True, False):
            s = layer_scales(linear, stats, recipe, alpha=0.5, per_channel=per_channel)
            q = QuantLinear.from_linear(linear, recipe.fmt, input_scale=s.input_scale, weight_scale=s.weight_scale,
                                        smooth=s.smooth)
            row: dict[str, Any] = {"format": recipe.fmt.value, "recipe": recipe_name,
                                   "weights": "per-channel" if per_channel else "per-tensor", "kernel": q.kernel.value}
            with torch.inference_mode():
                emulated = q.use_kernel(Kernel.EMULATE)(x).float()
                row["rel_err_emulation_vs_float"] = rel_err(emulated, ref)
                q.use_kernel(None)  # back to `select_kernel`'s choice
                if q.kernel is Kernel.EMULATE:
                    row["status"] = SKIP_CUDA if device.type != "cuda" else "skipped: no GPU kernel for this layer"
                else:
                    got = q(x).float()
                    row["rel_err_kernel_vs_emulation"] = rel_err(got, emulated)
                    row["max_rel_err_kernel_vs_emulation"] = max_rel_err(got, emulated)
                    row["rel_err_kernel_vs_float"] = rel_err(got, ref)
                    row["kernel_ms"] = measure("k", lambda q=q: q(x), device=device, runs=5).median_ms
                    row["status"] = "ok"
            rows.append(row)
            del q
    shape = {"m": x.shape[0], "k": linear.in_features, "n": linear.out_features}
    if device.type == "cuda":  # the float GEMM these kernels replace, for scale
        xb, wb = x.to(torch.bfloat16), linear.weight.to(torch.bfloat16)
        shape["bf16_linear_ms"] = measure("bf16", lambda: F.linear(xb, wb), device=device, runs=5).median_ms
    statuses = {r["status"] for r in rows}
    status = "ok" if statuses == {"ok"} else (SKIP_CUDA if device.type != "cuda" else "partial: " + ", ".join(statuses))
    return {"status": status, "layer": LAYER, **shape, "rows": rows}


def issue4(report: Report, config: ModelConfig, args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype) -> None:
    x = dit_inputs(config, args.quant_size, 4, device)
    inputs = (x.img.to(dtype), x.pe, x.t.to(dtype), x.llm_embedding.to(dtype), x.llm_mask)
    state: dict[str, Any] = {}

    def step(model: nn.Module) -> Tensor:
        with torch.inference_mode():
            return model(*inputs)

    def bf16_step() -> dict[str, Any]:
        state["dit"] = dit = build_dit(config, device, dtype, seed=0)
        collector = StatsCollector(dit)
        captured: dict[str, Tensor] = {}
        layer = dict(dit.named_modules())[LAYER]
        hook = layer.register_forward_pre_hook(lambda _m, a: captured.setdefault("x", a[0].detach().clone()))
        try:
            with collector.active():  # the artifact's statistics: one eager step at this size
                state["ref"] = step(dit).float()
        finally:
            hook.remove()
        state["stats"], state["layer_x"] = collector.stats, captured["x"]
        timing = measure("bf16 step", lambda: step(dit), device=device, runs=args.runs)
        return {"size": x.size, "tokens": x.tokens, "dtype": str(dtype), **_timing(timing),
                "pred_rms": float(state["ref"].pow(2).mean().sqrt())}

    if report.run(f"4.step_{_short(dtype)}@{x.size}", bf16_step, need_s=40 * args.scale)["status"] != "ok":
        state.clear()
        free(device)
        return
    report.run("4.layer_kernels", lambda: layer_kernel_check(
        dict(state["dit"].named_modules())[LAYER], state.pop("layer_x"), device), need_s=10 * args.scale)
    artifacts: dict[str, Any] = {}

    def build_artifacts() -> dict[str, Any]:
        for recipe in ("fp8", "int8-sq"):  # both before any in-place swap: int8-sq reads the float weights
            artifacts[recipe] = build_artifact(state["dit"], state["stats"], recipe, model_hash="random-weights",
                                               calibration={"steps": 1, "size": x.size})
        return {"layers": {k: len(a.layers) for k, a in artifacts.items()}}

    report.run("4.artifacts", build_artifacts, need_s=10 * args.scale)
    for recipe in ("fp8", "int8-sq"):
        if recipe not in artifacts:
            break

        def quant_step(recipe: str = recipe) -> dict[str, Any]:
            # The first format reuses the calibrated model; the next rebuilds it (same seed: same weights).
            held = {"model": state.pop("dit", None) or build_dit(config, device, dtype, seed=0)}
            _check_probe(held["model"], artifacts[recipe])
            quantize_model(held["model"], artifacts[recipe], check_hash=False)
            kernels = sorted({m.kernel.value for m in held["model"].modules() if isinstance(m, QuantLinear)})
            try:
                pred = step(held["model"]).float()
                timing = measure(f"{recipe} step", lambda: step(held["model"]), device=device, runs=args.runs)
            finally:
                held.clear()
                free(device)
            ref = state["ref"]
            return {"size": x.size, "kernels": kernels, **_timing(timing), "rel_err_vs_bf16": rel_err(pred, ref),
                    "max_rel_err_vs_bf16": max_rel_err(pred, ref),
                    "finite": bool(torch.isfinite(pred).all())}

        report.run(f"4.step_{recipe}@{x.size}", quant_step, need_s=40 * args.scale)
    state.clear()
    free(device)


def _check_probe(model: nn.Module, artifact: Any) -> None:
    """The rebuilt model must be the calibrated one (the hash check is off: hashing 24 GB takes a minute)."""
    from step1x_export.calibrate.artifact import weight_probe

    name, scales = next(iter(artifact.layers.items()))
    got = weight_probe(dict(model.named_modules())[name].weight)
    if not torch.equal(got, scales.weight_probe):
        raise ValueError(f"rebuilt DiT differs from the calibrated one at {name}: seeded init not reproducible")


def _timing(result: Any) -> dict[str, Any]:
    if result.status != "ok":
        raise RuntimeError(f"timing failed: {result.error}")
    return {"median_ms": result.median_ms, "first_call_ms": result.first_call_ms, "runs": result.runs,
            "peak_mem_gb": result.peak_mem_gb}


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


# -- issue 3: ONNX export of the full-width DiT ------------------------------------------------------
def export_config(config: ModelConfig) -> ModelConfig:
    """Full width (hidden, heads, connector as `config`), depth cut to 2 double + 2 single blocks."""
    dit = dataclasses.replace(config.dit, depth=2, depth_single_blocks=2)
    return dataclasses.replace(config, name=f"{config.name}-2+2", dit=dit)


def issue3(report: Report, config: ModelConfig, args: argparse.Namespace, device: torch.device) -> None:
    from step1x_export.export.onnx_io import export_graph

    cfg = export_config(config)
    spec = dit_spec(cfg)
    x = dit_inputs(cfg, args.export_size, 4, torch.device("cpu"))
    inputs = (x.img.contiguous(), x.pe, x.t, x.llm_embedding, x.llm_mask)  # spec order, fp32, on CPU
    path = args.out_dir / "dit_2+2" / "dit.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}

    def export() -> dict[str, Any]:
        t0 = time.perf_counter()
        state["model"] = model = build_dit(cfg, torch.device("cpu"), torch.float32, seed=3)
        built = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        files = export_graph(model, inputs, spec, path)  # > 2 GB: external data + shape inference from the file
        return {"params_m": params / 1e6, "fp32_gb": 4 * params / 1e9, "build_s": built,
                "export_s": time.perf_counter() - t0, "size": x.size,
                "files": {f.name: f.stat().st_size for f in files}}

    report.run("3.export_dit_2+2", export, need_s=120 * args.scale)
    if "model" not in state or not path.exists():
        return

    def parity() -> dict[str, Any]:
        import onnxruntime as ort

        model = state.pop("model")
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        feeds = {name: t.numpy() for name, t in zip(spec.input_names, inputs, strict=True)}
        t0 = time.perf_counter()
        got = torch.from_numpy(session.run(None, feeds)[0])
        ort_s = time.perf_counter() - t0
        del session
        ref_device = device
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
        with torch.inference_mode():
            ref = model.to(ref_device)(*(t.to(ref_device) for t in inputs)).float().cpu()
        del model
        free(device)
        return {"max_rel_err": max_rel_err(got, ref), "rel_err": rel_err(got, ref), "ort_load_s": load_s,
                "ort_run_s": ort_s, "torch_ref_device": str(ref_device)}

    report.run("3.ort_parity", parity, need_s=60 * args.scale)
    state.clear()
    free(device)


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "device_checks_out")))
    p.add_argument("--model", default="v1.1", help="full-size config (v1.1 / v1.0); 'tiny' for a CPU dry run")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--sizes", default=None, help="issue-5 sizes (default 512,1024; tiny: 32,64)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps K of the eager / graphed comparison")
    p.add_argument("--edit-size", type=int, default=None, help="whole-edit size for peak memory (0: none)")
    p.add_argument("--edit-steps", type=int, default=4, help="steps of that edit (peak memory does not grow with it)")
    p.add_argument("--quant-size", type=int, default=None, help="issue-4 step size (default 1024; tiny 64)")
    p.add_argument("--export-size", type=int, default=None, help="issue-3 parity size (default 512; tiny 32)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per quantized step")
    p.add_argument("--budget-s", type=float, default=430.0, help="entries that would end after this are skipped")
    p.add_argument("--no-mllm", action="store_true", help="whole edit without the 7B-shaped MLLM (stub conditioning)")
    p.add_argument("--checks", default="5,4,3", help="which issues' checks to run, in order")
    args = p.parse_args(argv)
    tiny = get_config(args.model).tiny_qwen is not None
    args.sizes = tuple(int(s) for s in (args.sizes or ("32,64" if tiny else "512,1024")).split(","))
    args.edit_size = args.edit_size if args.edit_size is not None else (64 if tiny else 512)
    args.quant_size = args.quant_size or (64 if tiny else 1024)
    args.export_size = args.export_size or (32 if tiny else 512)
    args.scale = 0.0 if tiny else 1.0  # budget estimates are for the full-size model
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("--device cuda but no CUDA device")
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    if device.type == "cpu" and args.scale:
        print("full-size checks need a GPU: use --model tiny --device cpu for a dry run")
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on CPU is slow and not the point
    torch.backends.cuda.matmul.allow_tf32 = False
    config = get_config(args.model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment_info(device)
    conditions = {"model": args.model, "dtype": _short(dtype), "sizes": args.sizes, "K": args.steps,
                  "edit": args.edit_size, "quant": args.quant_size, "export": args.export_size}
    print("\n".join(header_lines(env, conditions)), flush=True)
    config_dict = {k: v for k, v in vars(args).items() if k != "out_dir"} | {"argv": sys.argv[1:]}
    report = Report(args.out_dir / "device_checks.json", env, config_dict, start, args.budget_s)
    report.data["notes"].append("random weights: latency and error figures only, no image quality")
    runs = {"5": lambda: issue5(report, config, args, device, dtype),
            "4": lambda: issue4(report, config, args, device, dtype),
            "3": lambda: issue3(report, config, args, device)}
    for issue in args.checks.split(","):
        runs[issue.strip()]()
        free(device)
    report.data["notes"].append(f"total wall time {time.monotonic() - start:.1f} s")
    report.save()
    print("\n".join(header_lines(env, conditions)))
    print(table(report.data["entries"]))
    return 0


# -- the table --------------------------------------------------------------------------------------
def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


SUMMARY_KEYS = ("eager_ms_step", "graph_ms_step", "speedup", "max_abs_diff", "peak_mem_gb", "mllm", "median_ms",
                "rel_err_vs_bf16", "kernels", "export_s", "max_rel_err", "rel_err", "error")


def table(entries: list[dict[str, Any]]) -> str:
    lines = [f"{'check':<22} {'status':<34} figures", "-" * 100]
    for e in entries:
        figures = ", ".join(f"{k}={_fmt(e[k])}" for k in SUMMARY_KEYS if e.get(k) is not None)
        lines.append(f"{e['name']:<22} {e['status'][:34]:<34} {figures}")
        for r in e.get("rows", []):
            errs = ", ".join(f"{k.replace('rel_err_', '')}={_fmt(v)}" for k, v in r.items() if k.startswith("rel_err"))
            lines.append(f"{'':<4}{r['format']:<9}{r['weights']:<12}{r['kernel']:<10}{r['status'][:20]:<21}{errs}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
