"""ONNX export -> TensorRT engines: optimization profiles from the I/O spec's dim ranges, strongly typed
networks for Q/DQ (explicit precision) graphs, a timing cache, an optimization-level flag, and a
manifest recording the GPU and TensorRT version each engine is bound to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...files import write_bytes_atomic
from ...hashing import file_sha256
from ...precision import Precision
from ...specs import ComponentSpec, DimRanges
from .buffers import ProfileShapes, profile_shapes
from .trt_manifest import EngineManifest, EngineRecord, current_platform


@dataclass(frozen=True)
class BuildOptions:
    strongly_typed: bool = True  # take every tensor type from the graph: required for Q/DQ graphs
    opt_level: int = 3  # TensorRT builder_optimization_level, 0..5: higher builds slower, may run faster
    timing_cache: Path | None = None  # read if present, written back after each build
    workspace_gib: float | None = None  # cap on TensorRT's scratch memory (None: TensorRT's default)
    refittable: bool = False  # REFIT flag: the engine's weights can be replaced by name (`export.refit`'s map)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"opt_level must be in 0..5, got {self.opt_level}")

    def check(self, component: str, precision: Precision) -> None:
        if precision.is_quantized and not self.strongly_typed:
            raise ValueError(f"{component}: {precision.value} graphs carry Q/DQ nodes: build them strongly typed")


def build_engine(onnx_path: Path, spec: ComponentSpec, profiles: list[ProfileShapes], out_path: Path,
                 precision: Precision, options: BuildOptions) -> None:
    """Parse `onnx_path` (exported in `precision`), build with `profiles`, serialise to `out_path` atomically."""
    import tensorrt as trt

    options.check(spec.name, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if options.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weight data is found beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{spec.name}: TensorRT cannot parse {onnx_path}:\n{errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(spec.input_names):
        raise ValueError(f"{spec.name}: {onnx_path} has inputs {sorted(names)}, the spec says {spec.input_names}")

    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    for flag in builder_flags(trt, options, precision):
        config.set_flag(flag)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{spec.name}: TensorRT failed to build {onnx_path} (see its log above)")
    write_bytes_atomic(out_path, memoryview(serialized))
    if options.timing_cache is not None:
        write_bytes_atomic(options.timing_cache, memoryview(config.get_timing_cache().serialize()))


def builder_flags(trt, options: BuildOptions, precision: Precision) -> list:
    """The BuilderFlags a build sets: REFIT when asked; the precision flag for weakly typed networks only (a
    strongly typed network takes its types from the graph and refuses precision flags)."""
    flags = [trt.BuilderFlag.REFIT] if options.refittable else []
    if not options.strongly_typed:
        flag = {Precision.BF16: trt.BuilderFlag.BF16, Precision.FP16: trt.BuilderFlag.FP16}.get(precision)
        flags += [flag] if flag is not None else []
    return flags


@dataclass(frozen=True)
class BuildInput:
    """One exported component: its ONNX file, spec, precision and the dims' ranges it was exported for."""

    name: str
    onnx: Path
    spec: ComponentSpec
    ranges: DimRanges
    precision: Precision


def build_all(config_name: str, inputs: list[BuildInput], out_dir: Path, options: BuildOptions,
              progress: Callable[[str], None] | None = None) -> EngineManifest:
    """Build every component into `out_dir` and write `engines.json` (after all engines are in place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = EngineManifest(config=config_name, platform_=current_platform())
    for item in inputs:  # check every component before the first (long) build
        options.check(item.name, item.precision)
    for item in inputs:
        if progress is not None:
            progress(item.name)
        profiles = [profile_shapes(item.spec, item.ranges)]
        out = out_dir / f"{item.name}.plan"
        build_engine(item.onnx, item.spec, profiles, out, item.precision, options)
        manifest.components[item.name] = EngineRecord(
            file=out.name, sha256=file_sha256(out), onnx_sha256=file_sha256(item.onnx),
            precision=item.precision.value, strongly_typed=options.strongly_typed, opt_level=options.opt_level,
            profiles=profiles,
        )
    manifest.write(out_dir)
    return manifest
