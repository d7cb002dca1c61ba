"""The TensorRT engine manifest: what each engine was built from and for (GPU, TensorRT version).

A serialized TensorRT engine only runs on the GPU architecture and TensorRT version that built it
(and is tuned for that exact GPU model): `check_compatible` refuses any other, before deserialising.
An engine folder is untrusted input (`folders`): `read` checks engines.json against a schema and keeps
every engine file inside the folder; `verify_files` checks each engine's sha256 before TensorRT parses it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...files import write_text_atomic
from ...folders import FILE_NAME, SHA256, UntrustedFileError, check_schema, member, read_json, verify_files
from ...precision import Precision
from ...specs import COMPONENTS, component_specs
from ...step1x_ref.configs import CONFIGS
from .buffers import ProfileShapes

MANIFEST_NAME = "engines.json"
FORMAT_VERSION = 1


class EngineMismatchError(RuntimeError):
    """An engine was built for another GPU or TensorRT version."""


class EngineFolderError(UntrustedFileError):
    """An engine folder's engines.json is malformed, or names a file outside, missing or changed."""


_SHAPE = {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": 0, "maximum": 1 << 24}}
_PROFILE = {"type": "object", "maxProperties": 64,
            "additionalProperties": {"type": "array", "minItems": 3, "maxItems": 3, "items": _SHAPE}}
_RECORD = {
    "type": "object", "additionalProperties": False,
    "required": ["file", "sha256", "onnx_sha256", "precision", "strongly_typed", "opt_level", "profiles"],
    "properties": {
        "file": FILE_NAME, "sha256": SHA256, "onnx_sha256": SHA256,
        "precision": {"enum": [p.value for p in Precision]},
        "strongly_typed": {"type": "boolean"},
        "opt_level": {"type": "integer", "minimum": 0, "maximum": 5},
        "profiles": {"type": "array", "minItems": 1, "maxItems": 64, "items": _PROFILE},
    },
}
_TEXT = {"type": "string", "maxLength": 200}
ENGINES_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["format_version", "config", "platform", "components"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "config": {"enum": sorted(CONFIGS)},
        "platform": {"type": "object", "additionalProperties": False,
                     "required": ["gpu_name", "compute_capability", "tensorrt_version"],
                     "properties": {"gpu_name": _TEXT, "compute_capability": _TEXT, "tensorrt_version": _TEXT}},
        "components": {"type": "object", "minProperties": 1, "propertyNames": {"enum": list(COMPONENTS)},
                       "additionalProperties": _RECORD},
    },
}


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
        """engines.json, checked against `ENGINES_SCHEMA`, every engine file named inside the folder."""
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir() or not (engine_dir / MANIFEST_NAME).exists():
            raise FileNotFoundError(f"{engine_dir} has no {MANIFEST_NAME}: not a TensorRT engine dir "
                                    "(build one with `step1x-export build`)")
        path = member(engine_dir, MANIFEST_NAME, error=EngineFolderError)
        d = read_json(path, error=EngineFolderError)
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise EngineFolderError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
        check_schema(d, ENGINES_SCHEMA, path, error=EngineFolderError)
        specs = component_specs(CONFIGS[d["config"]])
        for name, record in d["components"].items():
            member(engine_dir, record["file"], error=EngineFolderError)
            for profile in record["profiles"]:
                if sorted(profile) != sorted(specs[name].input_names):
                    raise EngineFolderError(f"{path}: component {name!r}: a profile covers {sorted(profile)}, "
                                            f"the engine's inputs are {specs[name].input_names}")
                for shapes in profile.values():
                    ok = len(shapes[0]) == len(shapes[1]) == len(shapes[2]) and all(
                        a <= b <= c for a, b, c in zip(*shapes, strict=True))
                    if not ok:
                        raise EngineFolderError(f"{path}: component {name!r}: profile shapes {shapes} are not "
                                                "min <= opt <= max of one rank")
        return cls(
            config=d["config"],
            platform_=BuildPlatform(**d["platform"]),
            components={k: EngineRecord.from_json(dict(v)) for k, v in d["components"].items()},
        )

    def verify_files(self, engine_dir: Path) -> None:
        """Each engine file's sha256, before TensorRT deserialises any of them."""
        verify_files(Path(engine_dir), {r.file: r.sha256 for r in self.components.values()},
                     f"engine folder {engine_dir}", error=EngineFolderError, hint="; rebuild it with "
                     "`step1x-export build`")


def current_platform() -> BuildPlatform:
    """This machine's GPU and TensorRT (needs both)."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; none is visible")
    major, minor = torch.cuda.get_device_capability()
    return BuildPlatform(torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__)
