"""Device check of quantization: one Linear's FP8 (`_scaled_mm`) / INT8 (`_int_mm`) kernel against its
emulation, per channel and per tensor; one DiT step in bf16 vs FP8 vs INT8-SmoothQuant (artifacts from the
statistics of one eager step). On CPU the kernels are emulated: the kernel rows say they need CUDA.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from step1x_export.bench.checks import SKIP_CUDA, CheckReport, free
from step1x_export.bench.ladder import max_rel_err, rel_err
from step1x_export.bench.measure import measure
from step1x_export.bench.models import build_dit, dit_inputs
from step1x_export.calibrate.apply import quantize_model
from step1x_export.calibrate.collect import InputStats, StatsCollector
from step1x_export.calibrate.qlinear import Kernel, QuantLinear
from step1x_export.calibrate.recipes import RECIPES, build_artifact, layer_scales
from step1x_export.step1x_ref.configs import ModelConfig

LAYER = "single_blocks.0.linear1"  # the widest GEMM of the DiT (hidden -> 3 * hidden + mlp): the kernel check's layer


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


def quant_checks(report: CheckReport, config: ModelConfig, args: argparse.Namespace, device: torch.device,
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

    if report.run(f"quant.step_{_short(dtype)}@{x.size}", bf16_step, need_s=40 * args.scale)["status"] != "ok":
        state.clear()
        free(device)
        return
    report.run("quant.layer_kernels", lambda: layer_kernel_check(
        dict(state["dit"].named_modules())[LAYER], state.pop("layer_x"), device), need_s=10 * args.scale)
    artifacts: dict[str, Any] = {}

    def build_artifacts() -> dict[str, Any]:
        for recipe in ("fp8", "int8-sq"):  # both before any in-place swap: int8-sq reads the float weights
            artifacts[recipe] = build_artifact(state["dit"], state["stats"], recipe, model_hash="random-weights",
                                               calibration={"steps": 1, "size": x.size})
        return {"layers": {k: len(a.layers) for k, a in artifacts.items()}}

    report.run("quant.artifacts", build_artifacts, need_s=10 * args.scale)
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

        report.run(f"quant.step_{recipe}@{x.size}", quant_step, need_s=40 * args.scale)
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
