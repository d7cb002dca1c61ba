"""Device check of export at full width: the DiT cut to 2 double + 2 single blocks (connector full) exported
to ONNX fp32 with `export_graph` (> 2 GB: external data), ONNX Runtime (CPU provider) vs torch fp32 on the
same inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch

from step1x_export.bench.checks import CheckReport, free
from step1x_export.bench.ladder import max_rel_err, rel_err
from step1x_export.bench.models import build_dit, dit_inputs
from step1x_export.specs import dit_spec
from step1x_export.step1x_ref.configs import ModelConfig


def export_config(config: ModelConfig) -> ModelConfig:
    """Full width (hidden, heads, connector as `config`), depth cut to 2 double + 2 single blocks."""
    dit = dataclasses.replace(config.dit, depth=2, depth_single_blocks=2)
    return dataclasses.replace(config, name=f"{config.name}-2+2", dit=dit)


def export_checks(report: CheckReport, config: ModelConfig, args: argparse.Namespace, device: torch.device) -> None:
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

    report.run("export.dit_2+2", export, need_s=120 * args.scale)
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

    report.run("export.ort_parity", parity, need_s=60 * args.scale)
    state.clear()
    free(device)
