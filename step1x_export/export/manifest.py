"""`manifest.json`: what an export folder holds, and the reader that refuses anything it cannot trust.

Written last and atomically by `export_components`: a folder without a valid manifest is not an export.
`load_manifest` treats the folder as untrusted input (`folders`): a strict schema, every file inside the
folder and listed with its sha256, checksums verified before a graph is parsed, each graph carrying this
export's id. `check_shapes` lets a runtime fail with the component's name and the expected shapes, not an
ORT or TensorRT shape error deep in a run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import onnx
from onnx import external_data_helper

from ..files import write_text_atomic
from ..folders import (
    FILE_NAME,
    SHA256,
    UntrustedFileError,
    check_no_unlisted,
    check_schema,
    member,
    read_json,
    verify_files,
)
from ..precision import Precision
from ..specs import COMPONENTS, ComponentSpec, DimRanges, TensorSpec, component_specs
from ..step1x_ref.configs import CONFIGS

MANIFEST = "manifest.json"
# 2: the Qwen config/processor files are listed with checksums (shared_files); 3: the merged LoRAs (loras)
FORMAT_VERSION = 3
QWEN_DIR = "qwen"  # the Qwen config + processor, so a runtime needs nothing but the export folder
META_EXPORT_ID = "step1x_export.export_id"
META_COMPONENT = "step1x_export.component"


class ExportError(UntrustedFileError):
    """An export folder is missing, incomplete, changed, mixed with another export, or used out of profile."""


@dataclass
class ComponentEntry:
    name: str
    file: str  # graph file name, relative to the export folder
    spec: ComponentSpec
    dims: DimRanges  # min/opt/max of the spec's dynamic dims
    precision: Precision
    source_hash: str  # module_hash of the torch module exported
    files: dict[str, str]  # every file of this component (graph, external data) -> sha256
    export_seconds: float = 0.0
    path: Path = field(default=Path(), compare=False)  # absolute path, set by the reader

    def expected_shapes(self) -> str:
        """"img [batch 1..2, img_tokens 4..484, 64], ..." for error messages."""
        return "; ".join(f"{t.name} {self._dims_text(t)}" for t in self.spec.inputs)

    def _dims_text(self, tensor: TensorSpec) -> str:
        parts = [str(d) if isinstance(d, int) else f"{d} {self.dims[d][0]}..{self.dims[d][2]}" for d in tensor.dims]
        return f"[{', '.join(parts)}]"

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Check input shapes against the spec and profile; returns the resolved dynamic dims."""
        missing = set(self.spec.input_names) - set(shapes)
        if missing:
            raise ExportError(f"{self.name}: missing inputs {sorted(missing)}; expected {self.expected_shapes()}")
        resolved: dict[str, int] = {}
        for t in self.spec.inputs:
            shape = tuple(shapes[t.name])
            bad = len(shape) != len(t.dims)
            for got, want in zip(shape, t.dims, strict=False):
                if isinstance(want, int):
                    bad |= got != want
                elif resolved.setdefault(want, got) != got:
                    bad = True
                else:
                    lo, _, hi = self.dims[want]
                    bad |= not lo <= got <= hi
            if bad:
                raise ExportError(
                    f"{self.name}: input {t.name} has shape {list(shape)}, outside the exported profile; "
                    f"expected {self.expected_shapes()}"
                )
        return resolved


@dataclass
class Manifest:
    export_id: str
    config: str  # model config name (v1.0, v1.1, tiny, ...)
    version: str
    opset: int
    exporter: str
    libraries: dict[str, str]
    components: dict[str, ComponentEntry]
    directory: Path = field(default=Path(), compare=False)
    shared_files: dict[str, str] = field(default_factory=dict)  # qwen/ config and processor files -> sha256
    loras: list[dict] = field(default_factory=list)  # merged into the exported DiT: {file, sha256, multiplier}
    format_version: int = FORMAT_VERSION

    def check_shapes(self, name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        return self.component(name).check_shapes(shapes)

    def component(self, name: str) -> ComponentEntry:
        if name not in self.components:
            raise ExportError(
                f"export {self.directory} has no component {name!r} (it has {', '.join(self.components)}); "
                f"re-export with --components including {name}"
            )
        return self.components[name]

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_json(self) -> str:
        data = {
            "format_version": self.format_version,
            "export_id": self.export_id,
            "config": self.config,
            "version": self.version,
            "opset": self.opset,
            "exporter": self.exporter,
            "libraries": self.libraries,
            "components": {n: _entry_to_dict(e) for n, e in self.components.items()},
            "shared_files": self.shared_files,
            "loras": self.loras,
        }
        return json.dumps(data, indent=2)

    def write(self, directory: Path) -> Path:
        """Atomically (temp name + rename) write manifest.json into `directory`."""
        return write_text_atomic(directory / MANIFEST, self.to_json())


def _entry_to_dict(e: ComponentEntry) -> dict:
    spec = {
        "inputs": [asdict(t) for t in e.spec.inputs],
        "outputs": [asdict(t) for t in e.spec.outputs],
    }
    return {
        "file": e.file,
        "precision": e.precision.value,
        "spec": spec,
        "dims": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in e.dims.items()},
        "source_hash": e.source_hash,
        "files": e.files,
        "export_seconds": round(e.export_seconds, 2),
    }


# -- reading: the manifest as untrusted input -------------------------------------------------------------
_DIM = {"type": "integer", "minimum": 1, "maximum": 1 << 24}
_TENSOR = {
    "type": "object", "required": ["name", "dtype", "dims"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
        "dtype": {"enum": ["compute", "float32", "int64"]},
        "dims": {"type": "array", "maxItems": 8,
                 "items": {"anyOf": [_DIM, {"type": "string", "pattern": "^[a-z_][a-z0-9_]{0,63}$"}]}},
    },
}
_TENSORS = {"type": "array", "minItems": 1, "maxItems": 64, "items": _TENSOR}
_FILES = {"type": "object", "minProperties": 1, "maxProperties": 64, "propertyNames": FILE_NAME,
          "additionalProperties": SHA256}
_ENTRY = {
    "type": "object", "additionalProperties": False,
    "required": ["file", "precision", "spec", "dims", "source_hash", "files"],
    "properties": {
        "file": FILE_NAME,
        "precision": {"enum": [p.value for p in Precision]},
        "spec": {"type": "object", "required": ["inputs", "outputs"], "additionalProperties": False,
                 "properties": {"inputs": _TENSORS, "outputs": _TENSORS}},
        "dims": {"type": "object", "maxProperties": 32, "additionalProperties": {
            "type": "object", "required": ["min", "opt", "max"], "additionalProperties": False,
            "properties": {"min": _DIM, "opt": _DIM, "max": _DIM}}},
        "source_hash": SHA256,
        "files": _FILES,
        "export_seconds": {"type": "number", "minimum": 0, "maximum": 1e7},
    },
}
_SHORT = {"type": "string", "maxLength": 200}
MANIFEST_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["format_version", "export_id", "config", "version", "opset", "exporter", "libraries",
                 "components", "shared_files", "loras"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "export_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "config": {"enum": sorted(CONFIGS)},
        "version": _SHORT,
        "opset": {"type": "integer", "minimum": 1, "maximum": 100},
        "exporter": _SHORT,
        "libraries": {"type": "object", "maxProperties": 64, "additionalProperties": _SHORT},
        "components": {"type": "object", "minProperties": 1, "propertyNames": {"enum": list(COMPONENTS)},
                       "additionalProperties": _ENTRY},
        "shared_files": {"type": "object", "maxProperties": 256,
                         "propertyNames": {**FILE_NAME, "pattern": f"^{QWEN_DIR}/"}, "additionalProperties": SHA256},
        "loras": {"type": "array", "maxItems": 256, "items": {
            "type": "object", "required": ["file", "sha256", "multiplier"], "additionalProperties": False,
            "properties": {"file": FILE_NAME, "sha256": SHA256, "multiplier": {"type": "number"}}}},
    },
}


def _tensor(d: dict) -> TensorSpec:
    return TensorSpec(d["name"], d["dtype"], tuple(d["dims"]))


def _entry_from_dict(name: str, d: dict, directory: Path) -> ComponentEntry:
    spec = ComponentSpec(name, tuple(_tensor(t) for t in d["spec"]["inputs"]),
                         tuple(_tensor(t) for t in d["spec"]["outputs"]))
    return ComponentEntry(
        name=name,
        file=d["file"],
        spec=spec,
        dims={k: (v["min"], v["opt"], v["max"]) for k, v in d["dims"].items()},
        precision=Precision.parse(d["precision"]),
        source_hash=d["source_hash"],
        files=d["files"],
        export_seconds=d.get("export_seconds", 0.0),
        path=member(directory, d["file"], error=ExportError),
    )


def load_manifest(directory: str | Path) -> Manifest:
    """Read and verify an export folder: every file listed, inside the folder, unchanged, and from this export.

    The manifest is untrusted input (`folders`): its JSON is checked against `MANIFEST_SCHEMA`, its specs
    against this package's, and every file's sha256 before any graph is parsed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"export folder {directory} does not exist")
    path = member(directory, MANIFEST, error=ExportError)
    if not path.is_file():
        raise ExportError(f"{directory} is not a valid export: no {MANIFEST} (an interrupted export writes none)")
    data = read_json(path, error=ExportError)
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {version!r}, this step1x-export reads {FORMAT_VERSION}; "
                          "re-export the folder")
    check_schema(data, MANIFEST_SCHEMA, path, error=ExportError)
    manifest = Manifest(
        export_id=data["export_id"], config=data["config"], version=data["version"], opset=data["opset"],
        exporter=data["exporter"], libraries=data["libraries"],
        components={n: _entry_from_dict(n, e, directory) for n, e in data["components"].items()},
        directory=directory, shared_files=data["shared_files"], loras=data["loras"],
    )
    check_consistent(manifest, path)
    verify_files(directory, manifest.shared_files, f"export {directory}", error=ExportError)
    if manifest.shared_files:  # the files transformers reads for the MLLM: every one of them verified
        check_no_unlisted(directory, QWEN_DIR, manifest.shared_files, f"export {directory}", error=ExportError)
    for entry in manifest.components.values():
        verify_component(manifest, entry)
    return manifest


def check_consistent(manifest: Manifest, path: Path) -> None:
    """What a schema cannot say: the specs are this package's, profiles are ordered, graphs are listed."""
    config = CONFIGS[manifest.config]
    if manifest.version != config.version:
        raise ExportError(f"{path}: version {manifest.version!r} does not match config {config.name} "
                          f"({config.version})")
    specs = component_specs(config)
    for name, entry in manifest.components.items():
        where = f"{path}: component {name!r}"
        if entry.spec != specs[name]:
            raise ExportError(f"{where}: its I/O spec differs from this step1x-export's spec of {name} for "
                              f"{config.name}; re-export with this version")
        if set(entry.dims) != entry.spec.dim_names():
            raise ExportError(f"{where}: dims {sorted(entry.dims)}, the spec uses {sorted(entry.spec.dim_names())}")
        bad = [d for d, (lo, opt, hi) in entry.dims.items() if not lo <= opt <= hi]
        if bad:
            raise ExportError(f"{where}: dims {bad} do not satisfy min <= opt <= max")
        if entry.file not in entry.files:
            raise ExportError(f"{where}: graph {entry.file} is not listed in its files with a checksum")
    if {"vision", "llm"} & manifest.components.keys() and not manifest.shared_files:
        raise ExportError(f"{path}: the vision/llm graphs need the {QWEN_DIR}/ files listed in shared_files")


def verify_component(manifest: Manifest, entry: ComponentEntry) -> None:
    """Checksums of every file first; only then is the graph parsed (its export id, its external data)."""
    where = f"component {entry.name!r} of export {manifest.directory}"
    verify_files(manifest.directory, entry.files, where, error=ExportError,
                 hint=f"; the graph takes {entry.expected_shapes()}")
    try:
        graph = onnx.load(entry.path, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends: the listed bytes are not a graph
        raise ExportError(f"{where}: {entry.file} is not an ONNX graph ({type(err).__name__})") from None
    meta = {p.key: p.value for p in graph.metadata_props}
    if meta.get(META_EXPORT_ID) != manifest.export_id or meta.get(META_COMPONENT) != entry.name:
        raise ExportError(
            f"{where}: {entry.file} comes from another export (export id {meta.get(META_EXPORT_ID)}, component "
            f"{meta.get(META_COMPONENT)}; expected {manifest.export_id}, {entry.name}); the graph must take "
            f"{entry.expected_shapes()}"
        )
    graph_dir = PurePosixPath(entry.file).parent
    for tensor in _graph_tensors(graph.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        member(manifest.directory / graph_dir, location, error=ExportError)
        if (graph_dir / location).as_posix() not in entry.files:
            raise ExportError(f"{where}: {entry.file} reads external data {location!r}, which is not listed "
                              "in its files with a checksum")


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph that may point at external data: initializers and attribute tensors, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _graph_tensors(sub)
