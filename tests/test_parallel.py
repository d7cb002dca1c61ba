"""One edit across 2 ranks (torchrun, gloo on CPU) gives the single-process latent: CFG, Ulysses, ring, + TeaCache."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from step1x_export.runtime.parallel.layout import ParallelDegrees, init_groups

ROOT = Path(__file__).resolve().parents[1]
# v1.2: one CFG branch per rank, or each branch's call split by heads (its text need not divide), each branch at
# its own text length, against its per-branch calls in one process
LAYOUTS = ["cfg=2", "ulysses=2", "ring=2", "teacache:0.4@cfg=2", "fbcache:0.08@ulysses=2", "tiny-v1.2/cfg=2",
           "tiny-v1.2/ulysses=2", "tiny-v1.2/teacache:0.4@ulysses=2", "tiny-v1.2/ring=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parallel") / "parity.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(ROOT / "tests" / "parallel_parity.py"), str(out), *LAYOUTS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_equal_one_process(two_ranks, layout):
    result = two_ranks[layout]
    assert result["rel_err"] <= 1e-6, result
    if result["decisions"] is not None:  # rank 0's decision, broadcast, is the single process's
        assert result["decisions"] == result["single_process_decisions"]
        assert result["computed"] + result["reused"] == len(result["decisions"])


def test_degrees_are_checked():
    with pytest.raises(ValueError, match="cfg_degree must be 1 or 2"):
        ParallelDegrees(cfg=3)
    with pytest.raises(ValueError, match="does not divide the DiT's 24 attention heads; use one of"):
        ParallelDegrees(ulysses=5).check_model(24)
    with pytest.raises(ValueError, match="must divide the 40 text tokens"):
        ParallelDegrees(ring=3).check_tokens(40, 30)
    with pytest.raises(ValueError, match="launch with `torchrun --nproc-per-node 2"):
        init_groups(ParallelDegrees(cfg=2), torch.device("cpu"))  # not started by torchrun: no RANK
