"""Export folders, engine folders and quantization artifacts are untrusted input.

A small synthetic export (two components with the tiny model's specs, tiny ONNX graphs, one with external
data, the qwen/ files) is mutated systematically: every key deleted, every value replaced by each other
JSON type, every number made huge, every path made absolute / `..` / a link out, every checksum dropped,
files truncated or flipped. Each mutation must end in the package's one-line refusal (a ValueError
subclass naming the file), never another exception; the CLI turns a sample into exit 1 without a traceback.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from step1x_export.calibrate.artifact import ArtifactError, LayerScales, QuantArtifact, load_artifact, save_artifact
from step1x_export.calibrate.formats import QuantFormat
from step1x_export.cli import main
from step1x_export.export import ExportError, load_manifest
from step1x_export.export.manifest import MANIFEST, META_COMPONENT, META_EXPORT_ID, ComponentEntry, Manifest
from step1x_export.hashing import file_sha256
from step1x_export.precision import Precision
from step1x_export.runtime.engines.buffers import profile_shapes
from step1x_export.runtime.engines.trt_manifest import (
    MANIFEST_NAME,
    BuildPlatform,
    EngineFolderError,
    EngineManifest,
    EngineRecord,
)
from step1x_export.specs import component_specs, dim_ranges, dit_spec
from step1x_export.step1x_ref.configs import get_config

CONFIG = get_config("tiny")
OTHER_TYPES = [None, True, -1, 2**70, 0.5, "x", [], {}]


def _graph(path: Path, component: str, export_id: str, *, external: bool) -> list[Path]:
    """A one-node ONNX graph carrying the export's id (what the reader checks after the checksums)."""
    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
    node = helper.make_node("Identity", ["w"], ["y"])
    graph = helper.make_graph([node], component, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                              initializer=[weight])
    model = helper.make_model(graph)
    for key, value in ((META_EXPORT_ID, export_id), (META_COMPONENT, component)):
        model.metadata_props.add(key=key, value=value)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
        return [path, path.with_name(f"{path.name}.data")]
    onnx.save_model(model, path)
    return [path]


def make_export(root: Path) -> Path:
    root.mkdir()
    export_id, specs, ranges = uuid.uuid4().hex, component_specs(CONFIG), dim_ranges(CONFIG)
    entries = {}
    for name, external in (("vae_decoder", True), ("llm", False)):
        files = _graph(root / f"{name}.onnx", name, export_id, external=external)
        spec = specs[name]
        entries[name] = ComponentEntry(name, files[0].name, spec, {d: ranges[d] for d in sorted(spec.dim_names())},
                                       Precision.FP32, "ab" * 32, {f.name: file_sha256(f) for f in files})
    (root / "qwen").mkdir()
    (root / "qwen" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    shared = {"qwen/config.json": file_sha256(root / "qwen" / "config.json")}
    Manifest(export_id, CONFIG.name, CONFIG.version, 20, "test", {"torch": "x"}, entries, root,
             shared_files=shared).write(root)
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("untrusted") / "export")


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(pristine, dst)
    return dst


def leaves(node: object, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """Every (path, value) of a JSON tree, containers included (root excluded)."""
    if path:
        yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))


def mutated(data: dict, path: tuple, value: object = ..., *, delete: bool = False) -> dict:
    out = copy.deepcopy(data)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def expect_refusal(load, error: type[Exception], label: str) -> str:
    """`load()` must raise `error` (a ValueError) with a one-line message; returns the message."""
    try:
        load()
    except error as err:
        message = str(err)
        assert "\n" not in message and 0 < len(message) < 600, (label, message)
        return message
    except Exception as err:  # noqa: BLE001 (the point: anything else is a failure)
        pytest.fail(f"{label}: {type(err).__name__} instead of a clean refusal: {err}")
    pytest.fail(f"{label}: accepted")


def _type_changes(value: object) -> list[object]:
    """Replacements of another JSON type than `value` (ints and floats count as one type, bool apart)."""
    def kind(v: object) -> str:
        return "bool" if isinstance(v, bool) else "number" if isinstance(v, int | float) else type(v).__name__
    return [v for v in OTHER_TYPES if kind(v) != kind(value)]


def test_pristine_export_loads(pristine):
    manifest = load_manifest(pristine)
    assert set(manifest.components) == {"vae_decoder", "llm"} and manifest.shared_files


def test_fuzzed_manifests_are_refused_cleanly(folder):
    path = folder / MANIFEST
    original = json.loads(path.read_text())
    cases: list[tuple[str, dict]] = []
    for where, value in leaves(original):
        label = "$." + ".".join(map(str, where))
        optional = where[-1] == "export_seconds" or where[:1] == ("libraries",)  # free-form information
        optional |= where[:1] == ("components",) and len(where) == 2  # a smaller export is still an export
        if not isinstance(where[-1], int) and not optional:
            cases.append((f"delete {label}", mutated(original, where, delete=True)))
        cases += [(f"{label} = {v!r}", mutated(original, where, v)) for v in _type_changes(value)]
        if isinstance(value, int | float) and not isinstance(value, bool):  # huge numbers
            cases += [(f"{label} = {v!r}", mutated(original, where, v)) for v in (2**70, 1e308, -(2**70))]
    for name, entry in original["components"].items():  # paths: absolute, '..', missing, a link out
        for bad in ("/etc/hostname", "../../../../etc/passwd", "sub/../../x.onnx", "absent.onnx", "link.onnx"):
            cases.append((f"{name}.file = {bad}", mutated(original, ("components", name, "file"), bad)))
            files = {bad: entry["files"][entry["file"]], **entry["files"]}
            cases.append((f"{name}.files += {bad}", mutated(original, ("components", name, "files"), files)))
        for dropped in entry["files"]:  # dropped checksums
            files = {k: v for k, v in entry["files"].items() if k != dropped}
            cases.append((f"{name}.files - {dropped}", mutated(original, ("components", name, "files"), files)))
    cases.append(("shared_files = {}", mutated(original, ("shared_files",), {})))
    os.symlink("/etc/hostname", folder / "link.onnx")
    print(f"{len(cases)} fuzzed manifests")
    assert len(cases) > 300
    for label, data in cases:
        path.write_text(json.dumps(data))
        message = expect_refusal(lambda: load_manifest(folder), ExportError, label)
        assert str(folder) in message, (label, message)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"format_version": NaN}', b"[1e999]", b"[" * 100_000 + b"]" * 100_000,
                                 b"\xff\xfe", b"[1, 2]", b'{"format_version": 3}', b"1" * 5000])
def test_malformed_manifest_text_is_refused(folder, raw):
    (folder / MANIFEST).write_bytes(raw)
    expect_refusal(lambda: load_manifest(folder), ExportError, repr(raw[:20]))


def test_tampered_files_are_refused_before_parsing(folder):
    graph = folder / "llm.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])  # an interrupted copy: protobuf would raise DecodeError
    assert "llm.onnx changed" in expect_refusal(lambda: load_manifest(folder), ExportError, "truncated")
    graph.write_bytes(data)
    (folder / "vae_decoder.onnx.data").write_bytes(b"\0" * 256)
    assert "vae_decoder.onnx.data changed" in expect_refusal(lambda: load_manifest(folder), ExportError, "data")


def test_unlisted_or_linked_files_in_the_qwen_folder_are_refused(folder):
    (folder / "qwen" / "tokenizer.json").write_text("{}")  # transformers would read it unverified
    assert "not listed" in expect_refusal(lambda: load_manifest(folder), ExportError, "unlisted")
    (folder / "qwen" / "tokenizer.json").unlink()
    (folder / "qwen" / "config.json").unlink()
    os.symlink("/etc/hostname", folder / "qwen" / "config.json")
    assert "outside" in expect_refusal(lambda: load_manifest(folder), ExportError, "link")


def test_external_data_outside_the_listed_files_is_refused(folder):
    """A graph whose checksum is listed may still name external data nobody listed: refused too."""
    model = onnx.load(folder / "llm.onnx")
    onnx.save_model(model, folder / "llm.onnx", save_as_external_data=True, location="extra.bin", size_threshold=0)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["components"]["llm"]["files"]["llm.onnx"] = file_sha256(folder / "llm.onnx")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert "extra.bin" in expect_refusal(lambda: load_manifest(folder), ExportError, "external")


def test_cli_refuses_a_tampered_export_in_one_line(folder, tmp_path):
    image, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (32, 32), "gray").save(image)
    manifest = json.loads((folder / MANIFEST).read_text())
    cases = {
        "outside": mutated(manifest, ("components", "llm", "file"), "../../../../etc/passwd"),
        "absolute": mutated(manifest, ("components", "llm", "file"), "/etc/hostname"),
        "no checksums": mutated(manifest, ("components", "llm", "files"), {}),
    }
    for label, data in cases.items():
        (folder / MANIFEST).write_text(json.dumps(data))
        result = CliRunner().invoke(main, ["edit", "--backend", "onnxruntime", "--engine-dir", str(folder),
                                           "--image", str(image), "--prompt", "x", "--out", str(out)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (label, result.output)
        assert "Traceback" not in result.output and result.output.count("\n") == 1, (label, result.output)
        assert not out.exists()


# -- TensorRT engine folders -------------------------------------------------------------------------------
HERE = BuildPlatform("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")


def make_engines(root: Path) -> Path:
    root.mkdir()
    (root / "dit.plan").write_bytes(b"not really an engine" * 10)
    profiles = [profile_shapes(dit_spec(CONFIG), dim_ranges(CONFIG))]
    record = EngineRecord("dit.plan", file_sha256(root / "dit.plan"), "cd" * 32, "bf16", True, 3, profiles)
    EngineManifest("tiny", HERE, {"dit": record}).write(root)
    return root


def test_fuzzed_engine_manifests_are_refused_cleanly(tmp_path):
    root = make_engines(tmp_path / "engines")
    EngineManifest.read(root).verify_files(root)  # pristine: loads and verifies
    original = json.loads((root / MANIFEST_NAME).read_text())
    cases = []
    for where, value in leaves(original):
        label = "$." + ".".join(map(str, where))
        if not isinstance(where[-1], int):
            cases.append((f"delete {label}", mutated(original, where, delete=True)))
        cases += [(f"{label} = {v!r}", mutated(original, where, v)) for v in _type_changes(value)]
    for bad in ("/etc/hostname", "../x.plan", "absent.plan"):
        cases.append((f"file = {bad}", mutated(original, ("components", "dit", "file"), bad)))
    cases.append(("sha256 of another file", mutated(original, ("components", "dit", "sha256"), "0" * 64)))
    for label, data in cases:
        (root / MANIFEST_NAME).write_text(json.dumps(data))

        def load() -> None:
            EngineManifest.read(root).verify_files(root)

        expect_refusal(load, EngineFolderError, label)


# -- quantization artifacts ---------------------------------------------------------------------------------
def make_artifact(path: Path) -> Path:
    layer = LayerScales(4, 3, torch.tensor(0.5), torch.full((3,), 0.25), torch.ones(4), torch.zeros(16))
    artifact = QuantArtifact("int8-sq", QuantFormat.INT8, "ab" * 32, "float32", {"blocks.0.lin": layer},
                             ("*",), (), alpha=0.5)
    return save_artifact(artifact, path)


def _with(path: Path, metadata: str | None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        current = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    if metadata is not None:
        meta = {"step1x_export.quant": metadata}
    save_file(tensors if tensors is not None else current, str(path), metadata=meta)


def test_fuzzed_artifacts_are_refused_cleanly(tmp_path):
    pristine = make_artifact(tmp_path / "a.safetensors")
    load_artifact(pristine)
    from safetensors import safe_open

    with safe_open(str(pristine), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["step1x_export.quant"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    cases = []
    for where, value in leaves(meta):
        label = "$." + ".".join(map(str, where))
        free = where[0] == "calibration" or (where[0] in ("include", "exclude") and len(where) == 1)
        optional = where == ("source",)  # the source file's identity: absent in artifacts made from a model in memory
        if not isinstance(where[-1], int) and not free and not optional:
            cases.append((f"delete {label}", json.dumps(mutated(meta, where, delete=True))))
        if not free:
            cases += [(f"{label} = {v!r}", json.dumps(mutated(meta, where, v))) for v in _type_changes(value)
                      if not (where == ("alpha",) and v is None)]
    cases += [("NaN", '{"format_version": NaN}'), ("not json", "{"), ("list", "[]")]
    tensor_cases = [
        ("nan scale", {**tensors, "blocks.0.lin.input_scale": torch.tensor(float("nan"))}),
        ("negative scale", {**tensors, "blocks.0.lin.weight_scale": -torch.ones(3)}),
        ("wrong shape", {**tensors, "blocks.0.lin.weight_scale": torch.ones(5)}),
        ("fp16", {**tensors, "blocks.0.lin.smooth": torch.ones(4, dtype=torch.float16)}),
        ("stray tensor", {**tensors, "other.input_scale": torch.tensor(1.0)}),
        ("missing scale", {k: v for k, v in tensors.items() if not k.endswith("input_scale")}),
    ]
    for label, text in cases:
        shutil.copy(pristine, tmp_path / "m.safetensors")
        _with(tmp_path / "m.safetensors", text)
        expect_refusal(lambda: load_artifact(tmp_path / "m.safetensors"), ArtifactError, label)
    for label, new in tensor_cases:
        shutil.copy(pristine, tmp_path / "m.safetensors")
        _with(tmp_path / "m.safetensors", None, new)
        expect_refusal(lambda: load_artifact(tmp_path / "m.safetensors"), ArtifactError, label)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(pristine.read_bytes()[:-10])
    expect_refusal(lambda: load_artifact(truncated), ArtifactError, "truncated")
    expect_refusal(lambda: load_artifact(tmp_path), ArtifactError, "a directory")
