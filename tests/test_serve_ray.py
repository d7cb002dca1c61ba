"""Ray Serve: a local Ray with 2 replicas of the tiny model behind Serve's HTTP proxy on a loopback port."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from serving import EDIT, assert_same_edit, env_with_worktree, input_png, pixels, serial_reference

from step1x_export.serve.load import free_port, run_load
from step1x_export.serve.ray_app import ReplicaPlan, run_ray
from step1x_export.serve.spec import RuntimeSpec, ServeLimits

pytestmark = pytest.mark.xdist_group("ray")  # one local Ray for the module
PNG = input_png()


@pytest.fixture(scope="module")
def ray_url():
    import ray
    from ray import serve

    env = {k: env_with_worktree()[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS")}  # workers import this checkout
    env |= {"RAY_raylet_start_wait_time_s": "300"}  # a busy 2-core machine can take minutes to register the node
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    limits = ServeLimits(max_queue=16, timeout_s=120, default_size_level=32)
    try:
        run_ray(RuntimeSpec("tiny", options={"device": "cpu"}), limits, ReplicaPlan(replicas=2, cpus_per_replica=1),
                host="127.0.0.1", port=port, blocking=False)  # returns once both replicas are loaded and warm
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_two_replicas_answer_64_requests_from_8_clients_without_loss_or_mix_up(ray_url):
    assert httpx.get(f"{ray_url}/readyz", timeout=30).status_code == 200
    seeds = list(range(100, 164))
    report = run_load(ray_url, PNG, seeds, clients=8, fields=EDIT, timeout_s=120)
    assert not report.errors and len(report.replies) == 64
    assert all(r.status == 200 for r in report.replies), [(r.status, r.body[:200]) for r in report.replies]
    reference = serial_reference(seeds, PNG)
    for reply in report.replies:
        assert reply.headers["x-seed"] == str(reply.seed)
        assert_same_edit(pixels(reply.body), reference[reply.seed], reply.seed)  # replicas batch their requests
    replicas = {json.loads(r.headers["x-model"])["replica"] for r in report.replies}
    assert len(replicas) == 2, replicas  # both replicas served
    print("2 Ray replicas, 8 clients:", report.summary())


def test_errors_and_metrics_come_through_the_ingress(ray_url):
    r = httpx.post(f"{ray_url}/v1/edits", data=EDIT, files={"image": ("x.txt", b"not an image", "text/plain")},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    metrics = httpx.get(f"{ray_url}/metrics", timeout=30)
    assert metrics.status_code == 200 and "step1x_request_seconds_bucket" in metrics.text


def test_replica_plan_options():
    limits = ServeLimits(max_queue=4)
    fixed = ReplicaPlan(replicas=3, gpus_per_replica=1).deployment_options(limits)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"]["num_gpus"] == 1
    assert "placement_group_bundles" not in fixed and fixed["max_ongoing_requests"] == 6
    multi = ReplicaPlan(gpus_per_replica=2, cpus_per_replica=4).deployment_options(limits)
    assert multi["placement_group_bundles"] == [{"CPU": 4, "GPU": 2}]
    assert multi["placement_group_strategy"] == "STRICT_PACK"
    auto = ReplicaPlan(min_replicas=1, max_replicas=4).deployment_options(limits)
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ValueError, match="both min_replicas and max_replicas"):
        ReplicaPlan(min_replicas=1)
    with pytest.raises(ValueError, match="whole GPUs"):
        ReplicaPlan(gpus_per_replica=1.5)


@pytest.mark.parametrize(("asked", "expected"), [(None, 3), (2, 2)])
def test_a_replica_edits_with_the_threads_it_was_given_unless_threads_is_set(monkeypatch, asked, expected):
    """The replica's CPUs reach its runtime's options: without them a small model on CPU runs each edit on the
    runtime's default of one thread, whatever the replica holds; an explicit --threads still wins."""
    import torch
    from ray import serve

    from step1x_export.serve.ray_app import EditReplica

    context = type("Context", (), {"replica_id": type("Id", (), {"unique_id": "r0"})()})()
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    before = torch.get_num_threads()
    options = {"device": "cpu"} | ({"threads": asked} if asked else {})
    try:
        replica = EditReplica(RuntimeSpec("tiny", options=options), ServeLimits(warmup=False), threads=3)
        assert replica.service.runtime.options.threads == expected
        assert torch.get_num_threads() == expected
        replica.service.close()
    finally:
        torch.set_num_threads(before)
