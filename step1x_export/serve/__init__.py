"""Serving: an HTTP edit service over `Step1XEditRuntime` (one process, or Ray Serve replicas).

    from step1x_export.serve import RuntimeSpec, ServeLimits, run_server
    run_server(RuntimeSpec("tiny"), ServeLimits(max_queue=8, timeout_s=120), port=8000)
    run_server(RuntimeSpec("toy"), ServeLimits(), keys=KeyPolicy(("a-secret-key",), max_concurrent=4))

Needs the `serve` extra (and `ray` for replicas): `pip install -e ".[serve,ray]"`.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "EditBatcher": ".queue",
    "EditService": ".service",
    "KeyPolicy": ".auth",
    "ReplicaPlan": ".ray_app",
    "RequestError": ".request",
    "RuntimeSpec": ".spec",
    "ServeLimits": ".spec",
    "create_app": ".app",
    "run_ray": ".ray_app",
    "run_server": ".server",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
