"""Per-component ONNX export (dynamo exporter, opset 20) with a verified manifest.

    manifest = export_components(pipeline, "out/", components=["dit", "vae_decoder"], precision="fp32")
    manifest = load_manifest("out/")          # checksums, export ids
    manifest.check_shapes("dit", {"img": (2, 64, 64), ...})
"""

from .export import GRAPH_PRECISIONS, QWEN_DIR, export_components
from .manifest import ComponentEntry, ExportError, Manifest, load_manifest

__all__ = ["GRAPH_PRECISIONS", "QWEN_DIR", "ComponentEntry", "ExportError", "Manifest", "export_components",
           "load_manifest"]
