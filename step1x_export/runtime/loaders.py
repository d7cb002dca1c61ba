"""Stage loaders per backend: what builds each engine, so stages can be loaded now or one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..calibrate.qcheckpoint import load_quantized_checkpoint, read_qcheckpoint_info
from ..hashing import FileIdentity, file_identity
from ..presets import check_dit_checkpoint
from ..safetensors_io import TensorReader
from ..sources import TINY, small_pipeline, weights_note
from ..specs import component_specs, dit_spec, vae_decoder_spec, vae_encoder_spec
from ..step1x_ref.configs import ModelConfig, get_config
from ..step1x_ref.mllm.conditioner import Qwen25VLEmbedder
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.vae.autoencoder import AutoEncoder, VAEDecoder, VAEEncoder
from ..step1x_ref.versions import edit_version
from ..step1x_ref.weights.loading import (
    CheckpointError,
    ModelFiles,
    check_qwen_dir,
    check_state_dict,
    detect_version,
    load_dit,
    load_vae,
    mllm_dirs,
)
from ..step1x_ref.weights.lora import LoraSpec, merge_loras
from .engines.buffers import BufferPool, Shape, select_profile
from .engines.mllm import prepare_mllm
from .engines.torch_engine import TorchEncoder, TorchEngine
from .offload.blocks import streamed_dit
from .options import RuntimeOptions
from .parallel.dit import parallel_dit
from .stages import Loader

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


def offloaded_dit(model: torch.nn.Module, options: RuntimeOptions, device: torch.device) -> torch.nn.Module:
    """The DiT as `options` keep it: every block resident, or (`resident_blocks`) the later ones streamed."""
    if options.resident_blocks is None:
        return model
    return streamed_dit(model, device, resident=options.resident_blocks, ahead=options.prefetch_blocks)


def dit_home(options: RuntimeOptions, device: torch.device) -> torch.device:
    """Where the DiT's weights are read to: the host when its blocks stream (the engine moves the rest)."""
    return torch.device("cpu") if options.resident_blocks is not None else device


def quantized_dit(model: torch.nn.Module, quant: str | Path | None, source: FileIdentity | None = None
                  ) -> torch.nn.Module:
    """The DiT with a calibration artifact's W8A8 layers swapped in (in place), or as it is without one.

    `source`: the identity of the file the model was loaded from (checked against the artifact's, no tensor
    hashing). Compiling is the runtime's job (on load of the dit stage), the same for every loader.
    """
    if quant is None:
        return model
    from ..calibrate.apply import quantize_model  # imported only when asked for
    from ..calibrate.artifact import load_artifact

    return quantize_model(model, load_artifact(Path(quant)), source=source)


def checkpoint_dit(quant: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The DiT from a quantized checkpoint: 8-bit tensors read straight onto the device (no float copy)."""
    model, info = load_quantized_checkpoint(quant, device, dtype)
    if info.config != config.name:
        raise ValueError(f"quantized checkpoint {quant} is for config {info.config}, the runtime loads {config.name}")
    return model


def _vae_half(files: ModelFiles, config: ModelConfig, half: str, device: torch.device) -> AutoEncoder:
    """The AutoEncoder with only `half` ("encoder" / "decoder") loaded: each VAE stage reads its own half once,
    so the two stages never hold the same weights twice (the other half stays on `meta`, unused)."""
    with torch.device("meta"):
        ae = AutoEncoder(config.vae)
    part = getattr(ae, half)
    reader = TensorReader(files.vae, device=device)
    stray = sorted(k for k in reader.infos if not k.startswith(("encoder.", "decoder.")))
    if stray:
        shown = ", ".join(stray[:10])
        raise CheckpointError(f"{files.vae} does not match the model: {len(stray)} unexpected keys: {shown}")
    state = {k.removeprefix(f"{half}."): v.float()
             for k, v in reader.read(k for k in reader.infos if k.startswith(f"{half}.")).items()}
    check_state_dict(part, state, f"{files.vae} ({half})")
    part.load_state_dict(state, strict=True, assign=True)
    return ae.eval().requires_grad_(False)


def _vae_stage(files: ModelFiles, config: ModelConfig, half: str, device: torch.device) -> AutoEncoder:
    """One VAE stage's model. The diffusers layout renames every key, so it is loaded whole through the key map
    (0.17 GB in fp32 per stage); the official file is read one half per stage."""
    if files.layout == "diffusers":
        return load_vae(files, config, device=device)
    return _vae_half(files, config, half, device)


def _refuse_loras_on_qcheckpoint(loras: Sequence[LoraSpec]) -> None:
    if loras:
        raise ValueError("--lora cannot be merged into a quantized checkpoint (its weights are already 8-bit); use "
                         "--quant with a calibration artifact made by `step1x-export calibrate --lora ...` instead")


def qwen_encoder(qwen_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 quant: str | None, processor_dir: Path | None = None) -> TorchEncoder:
    """The MLLM stage from a Qwen2.5-VL directory: loaded on the host, trimmed and quantized there, then
    moved, so the device only ever holds what the stage keeps."""
    embedder = Qwen25VLEmbedder.from_pretrained(qwen_dir, config.embedder, dtype, "cpu", processor_dir=processor_dir)
    return TorchEncoder(edit_version(config).embedder(prepare_mllm(embedder, quant).to(device)))


def torch_loaders(
    source: str | Path, options: RuntimeOptions, device: torch.device, *, version: str | None, quant, seed: int,
    loras: Sequence[LoraSpec] = (),
) -> tuple[ModelConfig, dict[str, Loader], tuple[str, ...]]:
    """`quant`: a calibration artifact (scales; applied to the float DiT) or a quantized checkpoint (the DiT itself)."""
    dtype = options.precision.compute_dtype
    # A missing file falls through to the artifact loader, whose error names it.
    info = read_qcheckpoint_info(quant) if quant is not None and Path(quant).is_file() else None
    qcheckpoint = info is not None
    if options.preset is not None:
        check_dit_checkpoint(options.preset, None if info is None else len(info.layout.int4), quant)
    if str(source) in TINY:
        pipe = small_pipeline(str(source), seed=seed, dtype=dtype)
        merge_loras(pipe.model, loras)  # before quantization, as for a model folder
        prepare_mllm(pipe.embedder, options.mllm_quant)
        for module in (pipe.model, pipe.ae, pipe.embedder):
            module.to(device)
        if qcheckpoint:
            _refuse_loras_on_qcheckpoint(loras)
            model = checkpoint_dit(Path(quant), pipe.config, device, dtype)
        else:
            model = quantized_dit(pipe.model, quant)
        model = parallel_dit(model, options.parallel)  # over torchrun's ranks: the same (replicated) weights
        model = offloaded_dit(model, options, device)
        return pipe.config, pipeline_loaders(pipe, device, dtype, dit=model), (weights_note(str(source), seed),)
    _refuse_engine_folder(Path(source))
    config = get_config(version or detect_version(source) or "v1.1")
    files = ModelFiles.in_dir(source, config.version)

    def dit() -> TorchEngine:
        home = dit_home(options, device)
        if qcheckpoint:
            _refuse_loras_on_qcheckpoint(loras)
            model = checkpoint_dit(Path(quant), config, home, dtype)
        else:
            model = load_dit(files, config, dtype=dtype, device=home)
            merge_loras(model, loras)  # before quantization: the scales apply to the merged weights
            model = quantized_dit(model, quant, file_identity(files.dit) if quant is not None else None)
        # over torchrun's ranks: another engine module, the same (replicated) weights
        return TorchEngine(offloaded_dit(parallel_dit(model, options.parallel), options, device), dit_spec(config),
                           dtype, device)

    return config, {
        "encoder": lambda: qwen_encoder(files.qwen, config, dtype, device, options.mllm_quant, files.processor),
        "vae_encoder": lambda: TorchEngine(VAEEncoder(_vae_stage(files, config, "encoder", device)),
                                           vae_encoder_spec(config), torch.float32, device),
        "dit": dit,
        "vae_decoder": lambda: TorchEngine(VAEDecoder(_vae_stage(files, config, "decoder", device)),
                                           vae_decoder_spec(config), torch.float32, device),
    }, ()


def mllm_loader(config: ModelConfig, mllm: str | Path | None, device: torch.device, dtype: torch.dtype,
                seed: int, quant: str | None = None) -> tuple[Loader, str]:
    """The MLLM stage for engine backends: torch, from a Qwen2.5-VL dir or a tiny config's seeded weights."""
    name = str(mllm) if mllm is not None else config.name
    if name in TINY:
        def tiny() -> TorchEncoder:  # the same weights as the torch backend's for this name and seed
            embedder = small_pipeline(name, seed=seed, dtype=dtype).embedder
            return TorchEncoder(edit_version(config).embedder(prepare_mllm(embedder, quant).to(device)))

        return tiny, f"MLLM: torch, {weights_note(name, seed)}"
    if mllm is None:
        raise ValueError(f"the engines are for {config.name}: pass the Qwen2.5-VL-7B-Instruct directory as mllm "
                         "(the MLLM runs in torch)")
    qwen, processor = mllm_dirs(mllm)
    check_qwen_dir(qwen)  # now, not when the stage is first loaded
    return (lambda: qwen_encoder(qwen, config, dtype, device, quant, processor)), f"MLLM: torch, from {qwen}"


def _check_components(source: Path, present: Iterable[str]) -> None:
    missing = [c for c in ENGINE_COMPONENTS if c not in present]
    if missing:
        raise FileNotFoundError(f"{source} lacks component(s) {missing}; it has {sorted(present)}")


def _refuse_engine_folder(source: Path) -> None:
    """An export or engine folder handed to the torch backend: say which backend loads it."""
    from ..export.manifest import MANIFEST
    from .engines.trt_manifest import MANIFEST_NAME

    found = [(name, backend) for name, backend in ((MANIFEST, "onnxruntime"), (MANIFEST_NAME, "tensorrt"))
             if (source / name).is_file()]
    if found:
        kinds = " and ".join(f"{name}: backend {backend!r}" for name, backend in found)
        raise ValueError(f"{source} is an export/engine folder ({kinds}; `edit --backend {found[0][1]} --engine-dir "
                         f"{source}`); the torch backend wants the model folder (official files or diffusers layout) "
                         "or a small model's name")


def engine_loaders(source: Path, backend: str, device: torch.device, dtype: torch.dtype, *, mllm, seed: int,
                   mllm_quant: str | None = None):
    """Loaders for an ONNX export dir (onnxruntime) or a TensorRT engine dir, and their shape check.

    The model config is the one the export / engines were made from (their manifest names it).
    """
    if not source.is_dir():
        raise FileNotFoundError(f"{backend} engine directory {source} does not exist")
    if backend == "tensorrt":
        return _tensorrt_loaders(source, device, dtype, mllm=mllm, seed=seed, mllm_quant=mllm_quant)
    from ..export import load_manifest
    from .engines.onnxruntime import OrtEngine, ort_embedder

    manifest = load_manifest(source)
    config = get_config(manifest.config)
    _check_components(source, manifest.components)

    def ort(name: str) -> Loader:
        entry = manifest.components[name]
        return lambda: OrtEngine(entry.path, entry.spec)

    graphs = edit_version(config).mllm_graphs  # v1.2's token mapping reads what the llm graph does not output
    if mllm is None and graphs and {"vision", "llm"} <= manifest.components.keys():
        encoder, note = (lambda: ort_embedder(manifest, config)), "MLLM: ONNX Runtime (vision + llm graphs)"
    else:
        encoder, note = mllm_loader(config, mllm, device, dtype, seed, mllm_quant)
        note += (" (the export has no vision/llm graphs, or mllm was given)" if graphs
                 else f" ({config.name}'s MLLM always runs in torch)")
    loaders = {"encoder": encoder, **{c: ort(c) for c in ENGINE_COMPONENTS}}

    def check(component: str, shapes: dict[str, Shape]) -> None:
        manifest.check_shapes(component, shapes)

    return config, loaders, check, (note,)


def _tensorrt_loaders(source: Path, device: torch.device, dtype: torch.dtype, *, mllm, seed: int,
                      mllm_quant: str | None = None):
    from .engines.trt_engine import TensorRTEngine
    from .engines.trt_manifest import EngineManifest, current_platform

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

    encoder, note = mllm_loader(config, mllm, device, dtype, seed, mllm_quant)
    loaders = {"encoder": encoder, **{c: trt(c) for c in ENGINE_COMPONENTS}}

    def check(component: str, shapes: dict[str, Shape]) -> None:
        select_profile(component, shapes, manifest.components[component].profiles)

    return config, loaders, check, (note, json.dumps(manifest.platform()))
