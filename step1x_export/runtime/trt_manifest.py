"""The TensorRT engine manifest: what each engine was built from and for (GPU, TensorRT version).

A serialized TensorRT engine only runs on the GPU architecture and TensorRT version that built it
(and is tuned for that exact GPU model): `check_compatible` refuses any other, before deserialising.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_text_atomic
from .buffers import ProfileShapes

MANIFEST_NAME = "engines.json"
FORMAT_VERSION = 1


class EngineMismatchError(RuntimeError):
    """An engine was built for another GPU or TensorRT version."""


@dataclass(frozen=True)
class BuildPlatform:
    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str


def check_compatible(built: BuildPlatform, here: BuildPlatform, source: str = "engine") -> None:
    """Refuse an engine from another GPU (name or compute capability) or another TensorRT version."""
    problems = [
        f"{what}: built with {a!r}, this machine has {b!r}"
        for what, a, b in (
            ("TensorRT version", built.tensorrt_version, here.tensorrt_version),
            ("GPU compute capability", built.compute_capability, here.compute_capability),
            ("GPU", built.gpu_name, here.gpu_name),
        )
        if a != b
    ]
    if problems:
        raise EngineMismatchError(f"{source} cannot run here ({'; '.join(problems)}); rebuild it on this machine "
                                  "with `step1x-export build`")


@dataclass
class EngineRecord:
    file: str  # relative to the engine dir
    sha256: str
    onnx_sha256: str
    precision: str
    strongly_typed: bool
    opt_level: int
    profiles: list[ProfileShapes]  # per profile: input -> (min, opt, max)

    @classmethod
    def from_json(cls, d: dict) -> EngineRecord:
        profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in d.pop("profiles")]
        return cls(profiles=profiles, **d)  # type: ignore[arg-type]


@dataclass
class EngineManifest:
    config: str  # model config name (the specs come from it)
    platform_: BuildPlatform
    components: dict[str, EngineRecord] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def platform(self) -> dict:
        return asdict(self.platform_)

    def check_platform(self, here: BuildPlatform, source: str = "engines") -> None:
        check_compatible(self.platform_, here, source)

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "config": self.config, "platform": self.platform(),
                "components": {k: asdict(v) for k, v in self.components.items()}}

    def write(self, engine_dir: Path) -> Path:
        path = engine_dir / MANIFEST_NAME
        write_text_atomic(path, json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def read(cls, engine_dir: Path) -> EngineManifest:
        path = Path(engine_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{engine_dir} has no {MANIFEST_NAME}: not a TensorRT engine dir "
                                    "(build one with `step1x-export build`)")
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {d.get('format_version')}, this code reads {FORMAT_VERSION}")
        return cls(
            config=d["config"],
            platform_=BuildPlatform(**d["platform"]),
            components={k: EngineRecord.from_json(dict(v)) for k, v in d["components"].items()},
        )


def current_platform() -> BuildPlatform:
    """This machine's GPU and TensorRT (needs both)."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; none is visible")
    major, minor = torch.cuda.get_device_capability()
    return BuildPlatform(torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__)
