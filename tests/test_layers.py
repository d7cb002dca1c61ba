"""The package's import graph: no cycle between modules, and every import between top-level parts of the
package points down the layers below (docs/design.md says why they are in this order). Every import counts,
also one inside a function or under TYPE_CHECKING: a deferred import is still a dependency."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PACKAGE = "step1x_export"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Bottom to top. A part may import from parts in lower layers only (and from itself).
LAYERS: tuple[tuple[str, ...], ...] = (
    # no package imports at all
    ("files", "precision", "timing", "validate", "choices", "_lazy", "presets", "threads", "instructions"),
    ("hashing", "safetensors_io", "onnx_files"),  # file formats over `files`
    ("folders",),  # untrusted model folders: hashing and file checks
    ("step1x_ref",),  # the model's maths and its weights, exactly as published
    ("specs", "sources"),  # each component's I/O contract; model sources by name
    ("calibrate",),  # quantization: scales as data, the layers that apply them
    ("export",),  # ONNX graphs (Q/DQ from calibrate's data) and their manifests
    ("runtime",),  # the edit over engines: torch, exported graphs, TensorRT engines
    ("plan", "bench", "serve", "toy"),  # tools over the runtime, independent of each other
    ("cli",),  # the command line over everything
)
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}

# Inside the reference, bottom to top, by what each part models (docs/design.md).
REFERENCE = "step1x_ref"
REFERENCE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("configs", "imaging"),  # the published configurations; image sizes and conversions
    ("sampling", "profiles", "dit", "vae"),  # the denoising loop; the edit sizes; the DiT and connector; the VAE
    ("weights", "edit_inputs"),  # layouts, loading, LoRA, random weights; what every version's edit shares
    ("mllm",),  # the Qwen2.5-VL conditioners and their processor; v1.2's thinking and reflection
    ("versions",),  # what differs between releases, over the parts below
    ("flow",),  # the order of one edit over stage engines, the version chosen from the config
    ("pipeline",),  # the reference edit: the flow over eager torch modules
)
REFERENCE_LAYER = {part: i for i, parts in enumerate(REFERENCE_LAYERS) for part in parts}

# Inside the runtime, bottom to top, by what each group does (docs/design.md). Modules directly in `runtime/`
# are the edit API itself (the top group, "<edit>"); every other module lives in the group that says its job.
RUNTIME = "runtime"
RUNTIME_LAYERS: tuple[tuple[str, ...], ...] = (
    ("telemetry",),  # peak memory, counters, step progress: reads the device, imports nothing of the runtime
    ("engines",),  # the engine protocol and its backends: torch (compiled blocks), ONNX Runtime, TensorRT
    ("offload",),  # weights kept in host memory: DiT blocks streamed ahead of their turn, stages swapped in
    ("step",),  # the denoising step over an engine: CUDA graphs, attention kernels, step caching, lanes
    ("parallel",),  # one edit over torchrun's ranks: a parallel DiT engine over the step's pieces
    ("<edit>",),  # options, stages, loaders, the denoiser, lanes, batching and the runtime API
)
RUNTIME_LAYER = {part: i for i, parts in enumerate(RUNTIME_LAYERS) for part in parts}
MAX_RUNTIME_TOP_MODULES = 8  # past this the top folder stops saying which module does what


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path) -> Iterator[str]:
    """Every dotted name an import statement of `module` names (relative imports resolved)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: {t for t in imported_names(m, p) if t in files and t != m} for m, p in files.items()}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


def reference_part(module: str) -> str | None:
    """The part of the reference `module` belongs to (None outside it, or for the reference's own __init__)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == REFERENCE else None


def runtime_part(module: str) -> str | None:
    """The group of the runtime `module` belongs to ("<edit>" for a module directly in `runtime/`), None
    outside it or for the runtime's own __init__ (the public names, which may point anywhere inside)."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != RUNTIME:
        return None
    return parts[2] if (ROOT / RUNTIME / parts[2]).is_dir() else "<edit>"


def test_every_part_has_a_layer():
    unplaced = sorted({part_of(m) for m in module_files()} - set(LAYER) - {"<package>", "__main__"})
    assert not unplaced, f"put these parts of the package in a layer of tests/test_layers.py: {unplaced}"
    unplaced = sorted({reference_part(m) for m in module_files()} - set(REFERENCE_LAYER) - {None})
    assert not unplaced, f"put these parts of step1x_ref in REFERENCE_LAYERS of tests/test_layers.py: {unplaced}"
    unplaced = sorted({runtime_part(m) for m in module_files()} - set(RUNTIME_LAYER) - {None})
    assert not unplaced, f"put these parts of runtime in RUNTIME_LAYERS of tests/test_layers.py: {unplaced}"


def test_runtime_top_folder_stays_small():
    """The runtime's own folder holds the edit API; everything else sits in the group that says what it does."""
    top = sorted(p.stem for p in (ROOT / RUNTIME).glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_RUNTIME_TOP_MODULES, f"{len(top)} modules directly in runtime/: {top}"


def upward_imports(part: Callable[[str], str | None], layer: dict[str, int]) -> list[str]:
    """Imports between two parts (as `part` names them) that do not point to a lower layer."""
    return [f"{a} -> {b} ({pa} is layer {layer[pa]}, {pb} is layer {layer[pb]})"
            for a, targets in import_graph().items() for b in sorted(targets)
            if (pa := part(a)) in layer and (pb := part(b)) in layer and pa != pb and layer[pa] <= layer[pb]]


def test_imports_point_down_the_layers():
    wrong = upward_imports(part_of, LAYER)
    assert not wrong, "imports that do not point to a lower layer:\n" + "\n".join(wrong)


def test_reference_imports_point_down_its_layers():
    wrong = upward_imports(reference_part, REFERENCE_LAYER)
    assert not wrong, "imports inside step1x_ref that do not point to a lower layer:\n" + "\n".join(wrong)


def test_runtime_imports_point_down_its_layers():
    wrong = upward_imports(runtime_part, RUNTIME_LAYER)
    assert not wrong, "imports inside runtime that do not point to a lower layer:\n" + "\n".join(wrong)


def test_the_runtime_checker_sees_an_engine_importing_the_step():
    """A planted import from an engine up into the step machinery is reported."""
    graph_edge = ("step1x_export.runtime.engines.torch_engine", "step1x_export.runtime.step.caching")
    pa, pb = (runtime_part(m) for m in graph_edge)
    assert (pa, pb) == ("engines", "step") and RUNTIME_LAYER[pa] <= RUNTIME_LAYER[pb]
    assert runtime_part("step1x_export.runtime.options") == "<edit>"
    assert runtime_part("step1x_export.runtime") is None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, None),
])
def test_cycle_finder(graph, cycle):
    """The checker itself finds a planted cycle (and none where there is none)."""
    assert find_cycle(graph) == cycle


def test_checker_sees_an_upward_import(tmp_path):
    """A planted upward import inside a function is reported: deferred imports count."""
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from ..runtime import x\n")
    assert "step1x_export.runtime.x" in set(imported_names("step1x_export.calibrate.m", mod))
