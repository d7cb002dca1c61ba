"""Stage loaders per backend: what builds each engine, so stages can be loaded now or one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..specs import component_specs, dit_spec, vae_decoder_spec, vae_encoder_spec
from ..step1x_ref.autoencoder import AutoEncoder, VAEDecoder, VAEEncoder
from ..step1x_ref.conditioner import Qwen25VLEmbedder
from ..step1x_ref.configs import CONFIGS, ModelConfig, get_config
from ..step1x_ref.loading import ModelFiles, check_qwen_dir, detect_version, load_dit, load_vae, mllm_dirs
from ..step1x_ref.lora import LoraSpec, merge_loras
from ..step1x_ref.pipeline import Step1XEditPipeline
from .buffers import BufferPool, Shape, select_profile
from .options import RuntimeOptions
from .stages import Loader
from .torch_engine import TorchEncoder, TorchEngine

TINY = tuple(name for name, c in CONFIGS.items() if c.tiny_qwen is not None)
ENGINE_COMPONENTS = ("vae_encoder", "dit", "vae_decoder")


def pipeline_loaders(pipe: Step1XEditPipeline, device: torch.device, dtype: torch.dtype, dit=None) -> dict[str, Loader]:
    """Engines over an existing pipeline's modules (tiny models and tests); `dit` replaces its DiT."""
    c = pipe.config
    model = dit if dit is not None else pipe.model
    return {
        "encoder": lambda: TorchEncoder(pipe.embedder),
        "vae_encoder": lambda: TorchEngine(VAEEncoder(pipe.ae), vae_encoder_spec(c), torch.float32, device),
        "dit": lambda: TorchEngine(model, dit_spec(c), dtype, device),
        "vae_decoder": lambda: TorchEngine(VAEDecoder(pipe.ae), vae_decoder_spec(c), torch.float32, device),
    }


def quantized_dit(model: torch.nn.Module, quant: str | Path | None) -> torch.nn.Module:
    """The DiT with a calibration artifact's W8A8 layers swapped in (in place), or as it is without one.

    Compiling is the runtime's job (on load of the dit stage), the same for every loader.
    """
    if quant is None:
        return model
    from ..calibrate.apply import quantize_model  # imported only when asked for
    from ..calibrate.artifact import load_artifact

    return quantize_model(model, load_artifact(Path(quant)))


def torch_loaders(
    source: str | Path, options: RuntimeOptions, device: torch.device, *, version: str | None, quant, seed: int,
    loras: Sequence[LoraSpec] = (),
) -> tuple[ModelConfig, dict[str, Loader], tuple[str, ...]]:
    dtype = options.precision.compute_dtype
    if str(source) in TINY:
        pipe = Step1XEditPipeline.random(str(source), seed=seed, dtype=dtype, loras=loras)
        for module in (pipe.model, pipe.ae, pipe.embedder):
            module.to(device)
        model = quantized_dit(pipe.model, quant)
        return pipe.config, pipeline_loaders(pipe, device, dtype, dit=model), (f"tiny random weights (seed {seed})",)
    config = get_config(version or detect_version(source) or "v1.1")
    files = ModelFiles.in_dir(source, config.version)

    def dit() -> TorchEngine:
        model = load_dit(files, config, dtype=dtype, device=device)
        merge_loras(model, loras)  # before quantization: the artifact's hash is of the merged weights
        return TorchEngine(quantized_dit(model, quant), dit_spec(config), dtype, device)

    def autoencoder() -> AutoEncoder:  # fp32 as upstream; loaded per VAE stage so each frees its half
        return load_vae(files, config, device=device)

    return config, {
        "encoder": lambda: TorchEncoder(Qwen25VLEmbedder.from_pretrained(files.qwen, config.embedder, dtype, device,
                                                                          processor_dir=files.processor)),
        "vae_encoder": lambda: TorchEngine(VAEEncoder(autoencoder()), vae_encoder_spec(config), torch.float32, device),
        "dit": dit,
        "vae_decoder": lambda: TorchEngine(VAEDecoder(autoencoder()), vae_decoder_spec(config), torch.float32, device),
    }, ()


def mllm_loader(config: ModelConfig, mllm: str | Path | None, device: torch.device, dtype: torch.dtype,
                seed: int) -> tuple[Loader, str]:
    """The MLLM stage for engine backends: torch, from a Qwen2.5-VL dir or a tiny config's seeded weights."""
    name = str(mllm) if mllm is not None else config.name
    if name in TINY:
        def tiny() -> TorchEncoder:  # the same weights as Step1XEditPipeline.random(name, seed=seed)
            return TorchEncoder(Step1XEditPipeline.random(name, seed=seed, dtype=dtype).embedder.to(device))

        return tiny, f"MLLM: torch, tiny random weights (seed {seed})"
    if mllm is None:
        raise ValueError(f"the engines are for {config.name}: pass the Qwen2.5-VL-7B-Instruct directory as mllm "
                         "(the MLLM runs in torch)")
    qwen, processor = mllm_dirs(mllm)
    check_qwen_dir(qwen)  # now, not when the stage is first loaded
    return (lambda: TorchEncoder(Qwen25VLEmbedder.from_pretrained(qwen, config.embedder, dtype, device,
                                                                  processor_dir=processor)),
            f"MLLM: torch, from {qwen}")


def _check_components(source: Path, present: Iterable[str]) -> None:
    missing = [c for c in ENGINE_COMPONENTS if c not in present]
    if missing:
        raise FileNotFoundError(f"{source} lacks component(s) {missing}; it has {sorted(present)}")


def engine_loaders(source: Path, backend: str, device: torch.device, dtype: torch.dtype, *, mllm, seed: int):
    """Loaders for an ONNX export dir (onnxruntime) or a TensorRT engine dir, and their shape check.

    The model config is the one the export / engines were made from (their manifest names it).
    """
    if not source.is_dir():
        raise FileNotFoundError(f"{backend} engine directory {source} does not exist")
    if backend == "tensorrt":
        return _tensorrt_loaders(source, device, dtype, mllm=mllm, seed=seed)
    from ..export import load_manifest
    from .onnxruntime import OrtEngine, ort_embedder

    manifest = load_manifest(source)
    config = get_config(manifest.config)
    _check_components(source, manifest.components)

    def ort(name: str) -> Loader:
        entry = manifest.components[name]
        return lambda: OrtEngine(entry.path, entry.spec)

    if mllm is None and {"vision", "llm"} <= manifest.components.keys():
        encoder, note = (lambda: ort_embedder(manifest, config)), "MLLM: ONNX Runtime (vision + llm graphs)"
    else:
        encoder, note = mllm_loader(config, mllm, device, dtype, seed)
        note += " (the export has no vision/llm graphs, or mllm was given)"
    loaders = {"encoder": encoder, **{c: ort(c) for c in ENGINE_COMPONENTS}}

    def check(component: str, shapes: dict[str, Shape]) -> None:
        manifest.check_shapes(component, shapes)

    return config, loaders, check, (note,)


def _tensorrt_loaders(source: Path, device: torch.device, dtype: torch.dtype, *, mllm, seed: int):
    from .trt_engine import TensorRTEngine
    from .trt_manifest import EngineManifest, current_platform

    manifest = EngineManifest.read(source)
    manifest.verify_files(source)  # checksums and platform: both refused before any engine is deserialised
    manifest.check_platform(current_platform())
    config = get_config(manifest.config)
    _check_components(source, manifest.components)
    specs = component_specs(config)
    pool = BufferPool(device)  # one static-buffer pool shared by every TensorRT stage

    def trt(name: str) -> Loader:
        record = manifest.components[name]
        return lambda: TensorRTEngine(source / record.file, specs[name], record.profiles, pool)

    encoder, note = mllm_loader(config, mllm, device, dtype, seed)
    loaders = {"encoder": encoder, **{c: trt(c) for c in ENGINE_COMPONENTS}}

    def check(component: str, shapes: dict[str, Shape]) -> None:
        select_profile(component, shapes, manifest.components[component].profiles)

    return config, loaders, check, (note, json.dumps(manifest.platform()))
