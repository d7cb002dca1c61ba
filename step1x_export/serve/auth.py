"""API keys: `Authorization: Bearer <key>` on every /v1 route once keys are set, and a concurrency limit per key.

Keys come from `--api-key`, a keys file (one a line, `#` comments) and the STEP1X_API_KEYS environment
variable (comma-separated). They are held only as SHA-256 digests and compared with `hmac.compare_digest`
against every known key (no early exit), so neither a key's content nor which key nearly matched shows in the
timing; they are never logged or echoed. A refusal says nothing about why (missing, malformed or unknown).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

KEYS_ENV = "STEP1X_API_KEYS"
OPEN_PATHS = ("/", "/healthz", "/readyz", "/metrics")  # outside /v1: open unless --protect-health
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(keys: Iterable[str] = (), keys_file: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Every key from the flag's values, the file and the environment; a file that cannot be read is an error
    naming it, a key with spaces or control characters one naming its source (never the key)."""
    env = os.environ if env is None else env
    found = [(k, "--api-key") for k in keys]
    if keys_file is not None:
        try:
            lines = keys_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"--api-keys-file {keys_file}: {e.strerror or e}") from None
        found += [(line.strip(), str(keys_file)) for line in lines if line.strip() and not line.strip().startswith("#")]
    found += [(k.strip(), KEYS_ENV) for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    for key, source in found:
        if not key.isprintable() or any(c.isspace() for c in key):
            raise ValueError(f"an API key from {source} holds spaces or control characters")
    return list(dict.fromkeys(k for k, _ in found))


@dataclass(frozen=True)
class KeyPolicy:
    """What the gate enforces; no keys: everything is open."""

    keys: tuple[str, ...] = ()
    max_concurrent: int = 0  # requests in flight per key on /v1 (0: no limit)
    protect_health: bool = False  # also require a key on /, /healthz, /readyz and /metrics
    retry_after_s: Callable[[], int] = lambda: 1  # the 429's Retry-After: about one edit's time

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


def openai_error(status: int, message: str, kind: str, code: str | None) -> JSONResponse:
    """OpenAI's error body; the /v1 routes outside its API read it too (`error.message`)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


class KeyGate:
    """ASGI middleware in front of the app: 401 for a request without a known key, 429 + Retry-After for one
    more than its key's concurrent requests."""

    def __init__(self, app: Any, policy: KeyPolicy):
        self.app, self.policy = app, policy
        self._digests = [_digest(k) for k in policy.keys]
        self._in_flight: Counter[int] = Counter()  # key index -> requests running (the event loop's thread only)

    def _known(self, header: bytes | None) -> int | None:
        """The index of the key the Authorization header carries, else None: compared with every key."""
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        given = _digest(token.strip() if scheme.lower() == "bearer" else "\0not a key")
        found = None
        for i, digest in enumerate(self._digests):
            if hmac.compare_digest(given, digest) and found is None:
                found = i
        return found

    def _guarded(self, path: str) -> bool:
        return path.startswith("/v1/") or path == "/v1" or (self.policy.protect_health and path in OPEN_PATHS)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.policy.enabled or not self._guarded(scope["path"]):
            return await self.app(scope, receive, send)
        key = self._known(dict(scope["headers"]).get(b"authorization"))
        if key is None:
            response = openai_error(401, "unauthorized", "invalid_request_error", "invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        limit = self.policy.max_concurrent
        if not (limit and scope["path"].startswith("/v1/")):
            return await self.app(scope, receive, send)
        if self._in_flight[key] >= limit:
            response = openai_error(429, f"this key already has {limit} requests running; retry after the "
                                    "Retry-After header's seconds", "rate_limit_error", "too_many_concurrent_requests")
            response.headers["Retry-After"] = str(max(1, self.policy.retry_after_s()))
            return await response(scope, receive, send)
        self._in_flight[key] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight[key] -= 1
