"""Ray Serve across nodes: two raylets on this machine, a replica on each, one killed mid-load.

    PYTHONPATH=. python benchmarks/serve_ray_nodes.py [--requests 48 --clients 8 --kill-after 12]

A local two-node Ray cluster (`ray.cluster_utils.Cluster`: a head and a second raylet, one CPU each, so one
replica of one CPU fits per node) runs the edit app (the tiny model) with two replicas behind the head's
proxy. While --clients clients send --requests edits, the replica on the second node is killed once
--kill-after answers have arrived. Checked and printed (JSON; exit status 1 if a check fails):

- the replicas ran on both nodes, and answers came from both;
- every request was answered 200 with its own seed's edit (equal to the serial edit in this process):
  requests in flight on the killed replica failed as server faults and were sent again by the client
  (`run_load(retries=...)`: an edit is a pure function of its request) and answered by a live replica;
- Serve replaced the killed replica (a new replica id, RUNNING) within --replace-timeout seconds.

Everything (Serve, Ray, both raylets) is shut down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
APP = "step1x-edit"


def replica_actors() -> dict[str, tuple[str, str]]:
    """Live replica id -> (actor name, node id), from the GCS actor table (no dashboard needed; Serve names
    replica actors after their ids)."""
    from ray._private.state import actors

    alive = actors(actor_state_name="ALIVE").values()
    return {a["Name"].rsplit("#", 1)[-1]: (a["Name"], a["Address"]["NodeID"])
            for a in alive if "EditReplica" in a.get("Name", "")}


def replica_nodes() -> dict[str, str]:
    return {replica: node for replica, (_, node) in replica_actors().items()}


def kill_replica(replica_id: str) -> None:
    import ray

    name, _ = replica_actors()[replica_id]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--kill-after", type=int, default=12, help="answers received before the kill")
    p.add_argument("--retries", type=int, default=3, help="client retries of a server fault")
    p.add_argument("--replace-timeout", type=float, default=300.0)
    args = p.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # the raylets' workers
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # a busy 2-core machine registers nodes slowly
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"  # as `serve --ray` sets it: spread by load

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from step1x_export.serve.load import free_port, run_load, wait_ready
    from step1x_export.serve.ray_app import ReplicaPlan, build_application
    from step1x_export.serve.spec import RuntimeSpec, ServeLimits

    fields = {"instruction": "add a red hat", "steps": "2", "size_level": "32"}
    image = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png, seeds = buf.getvalue(), list(range(200, 200 + args.requests))
    port = free_port()
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    result: dict[str, object] = {}
    try:
        worker_node = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        limits = ServeLimits(timeout_s=120, default_size_level=32)
        plan = ReplicaPlan(replicas=2, cpus_per_replica=1)
        serve.run(build_application(RuntimeSpec("tiny", options={"device": "cpu"}), limits, plan), name=APP,
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        placed = replica_nodes()
        result["started_s"] = round(time.perf_counter() - t0, 1)
        result["replica_nodes"] = placed
        on_worker = [r for r, node in placed.items() if node == worker_node.node_id]
        result["replicas_on_both_nodes"] = len(set(placed.values())) == 2 and len(on_worker) == 1

        killed: dict[str, object] = {}
        answered = threading.Semaphore(0)

        def killer() -> None:
            for _ in range(args.kill_after):
                answered.acquire()
            killed["replica"], killed["at_s"] = on_worker[0], time.perf_counter()
            kill_replica(on_worker[0])

        report_box: dict[str, object] = {}

        def load() -> None:
            report_box["report"] = run_load(url, png, seeds, clients=args.clients, fields=fields, timeout_s=120,
                                            retries=args.retries, on_reply=lambda _: answered.release())

        threads = [threading.Thread(target=killer, daemon=True), threading.Thread(target=load)]
        for t in threads:
            t.start()
        threads[1].join()
        report = report_box["report"]
        from step1x_export.runtime import Step1XEditRuntime

        with Step1XEditRuntime.load("tiny") as rt:
            reference = {s: np.asarray(rt.edit(image, fields["instruction"], seed=s, steps=2, size_level=32))
                         for s in seeds}
        mixed = [r.seed for r in report.ok if r.headers.get("x-seed") != str(r.seed) or not np.array_equal(
            np.asarray(Image.open(io.BytesIO(r.body)).convert("RGB")), reference[r.seed])]
        served_by = {json.loads(r.headers["x-model"])["replica"] for r in report.ok}
        deadline = time.monotonic() + args.replace_timeout
        while time.monotonic() < deadline:
            now = replica_nodes()
            if len(now) == 2 and killed.get("replica") not in now:
                break
            time.sleep(1)
        replaced = replica_nodes()
        result |= {
            "summary": report.summary(), "killed": killed.get("replica"),
            "all_answered_200": len(report.ok) == len(seeds) and not report.errors,
            "statuses": sorted({r.status for r in report.replies}), "transport_errors": report.errors[:5],
            "retried": sorted(r.seed for r in report.replies if r.attempts > 1),
            "mixed_up": mixed, "served_by": sorted(served_by),
            "answered_by_both_replicas": len(served_by & set(placed)) == 2,
            "replaced_by": sorted(set(replaced) - set(placed)), "replicas_after": replaced,
            "replaced": len(replaced) == 2 and killed.get("replica") not in replaced,
            "wall_s": round(time.perf_counter() - t0, 1), "loadavg_1m": os.getloadavg()[0],
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result, indent=2, default=str))
    checks = ("replicas_on_both_nodes", "all_answered_200", "answered_by_both_replicas", "replaced")
    ok = all(result.get(c) for c in checks) and not result.get("mixed_up")
    print("PASS" if ok else "FAIL: " + ", ".join(c for c in checks if not result.get(c)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
