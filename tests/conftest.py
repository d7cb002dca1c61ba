import os
import sys
from pathlib import Path

import pytest

# tests import their shared helpers (keymaps, test_runtime) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
# Every edit in the suite computes its MLLM conditioning (and nothing is written to the user's cache), in this
# process and in the servers and CLIs it starts; tests/test_conditioning_cache.py turns the cache on for itself.
os.environ["STEP1X_EXPORT_CACHE"] = "off"
# xdist workers share the cores: each worker's ops (and the CLIs and servers it starts) get an equal share of
# threads, not every core each. With every core per worker, the workers' OpenMP threads spin against each
# other: on this project's 2-core machine (with other work running), tests/test_pipeline.py, test_runtime.py
# and test_caching.py under `-n 2` took 150-172 s with two threads per worker and 36-41 s with one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

# Tiny VAE graphs are ~9-13 MB, the others 0.5-3.5 MB: this threshold sends the VAE graphs to external
# data and keeps the rest inline, so one export covers both ways of writing a graph.
EXTERNAL_THRESHOLD = 5_000_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "isa: compares float paths whose kernels depend on the CPU's vector ISA (compiled vs eager, "
        "ONNX Runtime vs torch); `.ci/run` runs these again under the narrowest ISA (scalar ATen and inductor "
        "code, MKL and oneDNN capped at SSE4)")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny reference pipeline with seeded random weights (model 0, VAE 1, MLLM 2)."""
    from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

    return Step1XEditPipeline.random("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_pipe, tmp_path_factory) -> Path:
    """One fp32 ONNX export of every component of `tiny_pipe` (the dynamo exporter takes ~45 s on 2 cores),
    shared by every test module that needs graphs; mark those modules `xdist_group("tiny_export")`."""
    from step1x_export.export import export_components
    from step1x_export.specs import COMPONENTS

    out = tmp_path_factory.mktemp("tiny_export")
    export_components(tiny_pipe, out, components=COMPONENTS, precision="fp32", progress=False,
                      external_data_threshold=EXTERNAL_THRESHOLD)
    return out


@pytest.fixture
def fresh_compiles():
    """Dynamo's cache and the process's compile backends emptied, so a test that counts compiles counts its own:
    runtimes share one backend per process, and a block type an earlier test compiled compiles nothing again."""
    import torch

    from step1x_export.runtime.engines import compile as compile_mod

    torch._dynamo.reset()
    compile_mod._BACKENDS.clear()
    yield
