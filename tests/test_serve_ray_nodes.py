"""Ray Serve across nodes, in CI: a head and a second raylet on this machine, a replica on each, requests spread
over both, the second node's replica killed mid-load; no request lost or mixed up (each answer bit for bit its
seed's serial edit), the killed replica replaced. The scenario is `benchmarks/serve_ray_nodes.py` (run by hand
with other request counts); here it runs as written, in a process of its own, bounded in time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("ray")  # on the single-node Ray module's worker, after it: one Ray at a time
ROOT = Path(__file__).resolve().parents[1]


def last_json(stdout: str) -> dict:
    """The script's record: the last top-level JSON object it printed (Ray may print before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return json.loads("\n".join(lines[start : end + 1]))


def test_two_nodes_lose_nothing_when_one_replica_is_killed() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_ray_nodes.py"), "--replace-timeout", "180"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    result = last_json(run.stdout)
    assert result["replicas_on_both_nodes"] and result["answered_by_both_replicas"], result
    assert result["all_answered_200"] and result["summary"]["ok"] == 48 and result["mixed_up"] == [], result
    assert result["killed"] and result["killed"] not in result["replicas_after"], result
    assert result["replaced"] and result["replaced_by"], result
    assert run.stdout.rstrip().endswith("PASS")
