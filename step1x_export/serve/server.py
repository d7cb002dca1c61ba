"""The single-process server: one runtime, the app under uvicorn, graceful stop on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import math

from .app import create_app
from .auth import KeyPolicy
from .service import EditService
from .spec import RuntimeSpec, ServeLimits


def run_server(spec: RuntimeSpec, limits: ServeLimits, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", keys: KeyPolicy | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Stopping refuses new connections, lets every accepted edit finish (up to
    the per-request limit), then frees the runtime. The model loads in the background: /readyz tells when.
    `keys` (when it holds any) guards the /v1 routes."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    service = EditService(spec, limits)
    config = uvicorn.Config(
        create_app(service, keys=keys), host=host, port=port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=math.ceil(limits.timeout_s) + 5,
    )
    uvicorn.Server(config).run()
