"""API keys without a model: where keys come from, which routes the gate guards (health open or not, as the
flag says), the per-key concurrency limit, and the command line's flags."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from step1x_export.serve.auth import KEYS_ENV, KeyGate, KeyPolicy, read_keys

KEY = "sk-test-0123456789abcdef"


def gated(policy: KeyPolicy, hold: asyncio.Event | None = None) -> TestClient:
    async def ok(request):
        if hold is not None and request.url.path == "/v1/slow":
            await hold.wait()
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in ("/v1/models", "/v1/slow", "/healthz",
                                                                            "/metrics", "/")])
    return TestClient(KeyGate(app, policy))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_come_from_the_flag_a_file_and_the_environment(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# the team's keys\nfile-key-1\n\n  file-key-2  \n")
    keys = read_keys(["flag-key"], keys_file, {KEYS_ENV: "env-key-1, env-key-2,"})
    assert keys == ["flag-key", "file-key-1", "file-key-2", "env-key-1", "env-key-2"]
    with pytest.raises(ValueError, match="holds spaces") as caught:
        read_keys([], None, {KEYS_ENV: "has\tspace"})
    assert "has" not in str(caught.value).replace("holds", "")  # the key is never echoed
    with pytest.raises(ValueError, match="--api-keys-file"):
        read_keys([], tmp_path / "missing", {})


@pytest.mark.parametrize("protect_health", [False, True])
def test_v1_needs_a_key_and_health_is_open_unless_protected(protect_health):
    client = gated(KeyPolicy((KEY, "other-key"), protect_health=protect_health))
    for headers in ({}, bearer(KEY[:-1] + "X"), bearer(KEY + "X"), {"Authorization": KEY}, bearer("")):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["message"] == "unauthorized"
        assert KEY not in r.text and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200
    for path in ("/healthz", "/metrics", "/"):
        assert client.get(path).status_code == (401 if protect_health else 200)
        assert client.get(path, headers=bearer(KEY)).status_code == 200


def test_no_keys_means_open():
    assert gated(KeyPolicy()).get("/v1/models").status_code == 200


def test_a_keys_concurrent_requests_over_its_limit_are_429_with_retry_after():
    """Driven on one event loop: the first request holds its slot until released."""
    hold = asyncio.Event()
    policy = KeyPolicy((KEY, "other-key"), max_concurrent=1, retry_after_s=lambda: 7)
    app = gated(policy, hold).app

    async def call(path: str, key: str) -> tuple[int, dict[str, str]]:
        sent: list[dict] = []
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "root_path": "",
                 "headers": [(b"authorization", f"Bearer {key}".encode())], "scheme": "http", "server": ("t", 80),
                 "client": ("c", 1)}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        start = sent[0]
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

    async def scenario():
        slow = asyncio.ensure_future(call("/v1/slow", KEY))
        await asyncio.sleep(0.05)
        refused = await call("/v1/models", KEY)
        other = await call("/v1/models", "other-key")
        hold.set()
        first = await slow
        after = await call("/v1/models", KEY)
        return refused, other, first, after

    refused, other, first, after = asyncio.run(scenario())
    assert refused[0] == 429 and refused[1]["retry-after"] == "7"
    assert other[0] == 200 and first[0] == 200 and after[0] == 200


def test_cli_reads_keys_and_never_echoes_them(monkeypatch, tmp_path):
    import step1x_export.serve.server as server_module
    from step1x_export.cli import main

    seen = {}
    monkeypatch.setattr(server_module, "run_server", lambda spec, limits, **kw: seen.update(kw))
    monkeypatch.setenv(KEYS_ENV, "env-key-secret")
    (tmp_path / "keys").write_text("file-key-secret\n")
    result = CliRunner().invoke(main, ["serve", "--api-key", "flag-key-secret", "--api-keys-file",
                                       str(tmp_path / "keys"), "--max-concurrent-per-key", "2", "--protect-health"])
    assert result.exit_code == 0, result.output
    keys = seen["keys"]
    assert keys.keys == ("flag-key-secret", "file-key-secret", "env-key-secret")
    assert keys.max_concurrent == 2 and keys.protect_health
    assert "3 API key(s)" in result.output and "secret" not in result.output
    result = CliRunner().invoke(main, ["serve", "--api-keys-file", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "missing" in result.output
    result = CliRunner().invoke(main, ["serve", "--ray", "--api-key", "k"])
    assert result.exit_code != 0 and "--ray" in result.output
