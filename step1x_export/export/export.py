"""`export_components`: a pipeline -> one ONNX graph per component + manifest.json, in one folder."""

from __future__ import annotations

import importlib.metadata
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ..hashing import file_sha256, module_hash
from ..instructions import KnownTasks
from ..precision import Precision
from ..sources import save_known_tasks
from ..specs import COMPONENTS, component_specs, dim_ranges
from ..step1x_ref.configs import ModelConfig
from ..step1x_ref.pipeline import Step1XEditPipeline
from ..step1x_ref.versions import edit_version
from ..step1x_ref.weights.lora import merged_loras
from .components import build_units
from .manifest import MANIFEST, META_COMPONENT, META_EXPORT_ID, QWEN_DIR, ComponentEntry, Manifest
from .onnx_io import DEFAULT_OPSET, EXPORTER, EXTERNAL_DATA_THRESHOLD, export_graph, save_graph

if TYPE_CHECKING:
    from ..calibrate.artifact import QuantArtifact

GRAPH_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)  # fp8/int8: calibration inserts Q/DQ later


def _versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "onnx", "onnxruntime", "onnxscript", "transformers"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def _prepare_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} is not empty (an export or other files); pass force=True / --force")
        # Invalidate the old export first: an interrupted re-export must not look valid.
        (out_dir / MANIFEST).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def export_components(
    pipeline: Step1XEditPipeline,
    out_dir: str | Path,
    *,
    components: Sequence[str] = COMPONENTS,
    precision: Precision | str = Precision.FP32,
    config: ModelConfig | None = None,
    force: bool = False,
    progress: bool = True,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    quant: QuantArtifact | None = None,
    known_tasks: KnownTasks | None = None,
) -> Manifest:
    """Export `components` of `pipeline` to `out_dir` as `{name}.onnx` + manifest.json (written last).

    precision: fp32, fp16 or bf16 graphs (the VAE graphs stay fp32). config: the model config whose
    specs and profile the graphs follow (default: the pipeline's). external_data_threshold: weights at
    or above this many bytes go to `{name}.onnx.data` (default 2 GiB, protobuf's limit). quant: a
    calibration artifact of the DiT; its layers become explicit Q/DQ in the dit graph (checked against
    the pipeline's DiT by hash first), and the manifest records the dit as fp8 / int8. known_tasks: the
    instructions the model learned, where it learned only a few (`sources.known_tasks` of its folder): written
    as the folder's tasks.json, so a runtime over the export warns about any other instruction as it does over
    the model.
    """
    precision = Precision.parse(precision)
    if precision not in GRAPH_PRECISIONS:
        raise ValueError(f"export writes {', '.join(p.value for p in GRAPH_PRECISIONS)} graphs; {precision.value} "
                         "graphs come from calibration (Q/DQ inserted into an fp32/bf16 export)")
    config = config or pipeline.config
    specs = component_specs(config)
    unknown = [c for c in components if c not in specs]
    if unknown or not components:
        raise ValueError(f"unknown components {unknown or '(none given)'}; choose from {', '.join(specs)}")
    mllm = sorted({"vision", "llm"} & set(components))
    if mllm and not edit_version(config).mllm_graphs:
        raise ValueError(f"{config.name}: components {mllm} are not exported for v1.2 (its text-token mapping "
                         "reads the LLM's input embeddings, which the llm graph does not output; the MLLM runs in "
                         "torch); export vae_encoder,dit,vae_decoder")
    if quant is not None:
        from ..calibrate.apply import check_model_hash  # only a quantized export needs the calibration code

        if "dit" not in components:
            raise ValueError("--quant quantizes the dit graph: include the dit component")
        check_model_hash(pipeline.model, quant)  # before any work: a mismatched artifact is refused
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, force)
    export_id = uuid.uuid4().hex
    ranges = dim_ranges(config)
    names = [c for c in specs if c in components]  # pipeline order
    units = build_units(pipeline, names, precision)
    entries: dict[str, ComponentEntry] = {}
    for name in tqdm(names, desc="export", unit="graph", disable=not progress):
        unit, spec = units[name], specs[name]
        source_hash = module_hash(unit.source)
        start = time.perf_counter()
        meta = {META_EXPORT_ID: export_id, META_COMPONENT: name, "step1x_export.source_hash": source_hash,
                "step1x_export.precision": unit.precision.value}
        files = export_graph(unit.module, unit.args, spec, out_dir / f"{name}.onnx", opset=opset,
                             external_data_threshold=external_data_threshold, metadata=meta)
        graph_precision = unit.precision
        if name == "dit" and quant is not None:
            files, graph_precision = _insert_qdq(files, quant, external_data_threshold)
        entries[name] = ComponentEntry(
            name=name, file=files[0].name, spec=spec, dims={d: ranges[d] for d in sorted(spec.dim_names())},
            precision=graph_precision, source_hash=source_hash,
            files={f.name: file_sha256(f) for f in files}, export_seconds=time.perf_counter() - start,
            path=files[0],
        )
        del units[name]  # free the precision copy before the next graph
    shared = save_qwen_files(pipeline, out_dir) if {"vision", "llm"} & set(names) else {}
    save_known_tasks(out_dir, known_tasks)  # None removes a file an earlier export (--force) left
    manifest = Manifest(export_id=export_id, config=config.name, version=config.version, opset=opset,
                        exporter=EXPORTER, libraries=_versions(), components=entries, directory=out_dir,
                        shared_files=shared, loras=merged_loras(pipeline.model))
    manifest.write(out_dir)
    return manifest


def _insert_qdq(files: list[Path], quant: QuantArtifact, external_data_threshold: int) -> tuple[list[Path], Precision]:
    """Rewrite an exported graph with the artifact's Q/DQ pairs, in place (same file names)."""
    from ..calibrate.onnx_qdq import insert_qdq

    model = insert_qdq(files[0], quant)  # loads external data too
    for f in files:
        f.unlink()
    new_files = save_graph(model, files[0], external_data_threshold=external_data_threshold)
    return new_files, Precision.FP8 if quant.recipe == "fp8" else Precision.INT8


def save_qwen_files(pipeline: Step1XEditPipeline, out_dir: Path) -> dict[str, str]:
    """The Qwen2.5-VL config and processor (tokenizer, chat template, image processor) the runtime needs,
    under `qwen/`; returns {path relative to out_dir: sha256} of every file written, for the manifest."""
    directory = out_dir / QWEN_DIR
    if directory.exists():  # a re-export (--force) must not leave files of the old processor behind
        shutil.rmtree(directory)
    directory.mkdir()
    pipeline.embedder.model.config.save_pretrained(directory)
    pipeline.embedder.processor.save_pretrained(directory)
    return {p.relative_to(out_dir).as_posix(): file_sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}
