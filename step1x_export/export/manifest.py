"""`manifest.json`: what an export folder holds, and the reader that refuses anything it cannot trust.

Written last and atomically by `export_components`: a folder without a valid manifest is not an export.
`load_manifest` checks every file's sha256, that each graph carries this export's id, and offers
`check_shapes` so a runtime fails with the component's name and the expected shapes, not an ORT
or TensorRT shape error deep in a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ..files import write_text_atomic
from ..hashing import file_sha256
from ..precision import Precision
from ..specs import ComponentSpec, DimRanges, TensorSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
META_EXPORT_ID = "step1x_export.export_id"
META_COMPONENT = "step1x_export.component"


class ExportError(ValueError):
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
        path=directory / d["file"],
    )


def load_manifest(directory: str | Path, *, verify: bool = True) -> Manifest:
    """Read and verify an export folder: every file present, unchanged, and from this export."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not a valid export: no {MANIFEST} (an interrupted export writes none)")
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{path}: format_version {data.get('format_version')}, expected {FORMAT_VERSION}")
        manifest = Manifest(
            export_id=data["export_id"], config=data["config"], version=data["version"], opset=data["opset"],
            exporter=data["exporter"], libraries=data["libraries"],
            components={n: _entry_from_dict(n, e, directory) for n, e in data["components"].items()},
            directory=directory,
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{path} is not a valid manifest: {err!r}") from err
    if verify:
        for entry in manifest.components.values():
            verify_component(manifest, entry)
    return manifest


def verify_component(manifest: Manifest, entry: ComponentEntry) -> None:
    where = f"component {entry.name!r} of export {manifest.directory}"
    for file in entry.files:
        if not (manifest.directory / file).is_file():
            raise ExportError(f"{where}: graph file {file} is missing; the graph takes {entry.expected_shapes()}")
    graph = onnx.load(entry.path, load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    if meta.get(META_EXPORT_ID) != manifest.export_id or meta.get(META_COMPONENT) != entry.name:
        raise ExportError(
            f"{where}: {entry.file} comes from another export (export id {meta.get(META_EXPORT_ID)}, component "
            f"{meta.get(META_COMPONENT)}; expected {manifest.export_id}, {entry.name}); the graph must take "
            f"{entry.expected_shapes()}"
        )
    for file, digest in entry.files.items():
        if file_sha256(manifest.directory / file) != digest:
            raise ExportError(f"{where}: {file} changed since export (sha256 mismatch); re-export it")
