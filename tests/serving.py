"""Helpers of the serving tests: a real server process on a free loopback port, raw HTTP, serial references."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from step1x_export.serve.load import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
EDIT = {"instruction": "add a red hat", "steps": "2", "size_level": "32"}  # tiny and fast: ~0.1 s per edit
CLI = [sys.executable, "-c", "from step1x_export.cli import main; main()"]


def input_png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def env_with_worktree() -> dict[str, str]:
    """Subprocesses (and Ray workers) import this checkout's package, not an installed copy. One torch
    thread each: the suite runs beside another pytest worker on two cores, and two spinning OpenMP threads
    per process on a busy machine make every op wait for a time slice (edits 10x slower)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


class ServerProcess:
    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([*CLI, "serve", "--model", "tiny", "--port", str(self.port), *args],
                                     env=env_with_worktree(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.ready_states: list[int] = []  # /readyz answers seen while waiting

    def wait_ready(self, timeout_s: float = 300) -> None:
        try:
            self.ready_states = wait_ready(self.url, timeout_s)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; exit code {self.proc.poll()}:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def server(args: list[str], log: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(args, log)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 when the series does not exist yet)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(predicate, timeout_s: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout_s} s")


def open_raw_edit(url: str, fields: dict[str, str], png: bytes) -> socket.socket:
    """Send a whole edit request over a plain socket and return it unread: closing it is a client leaving."""
    request = httpx.Request("POST", f"{url}/v1/edits", files={"image": ("in.png", png, "image/png")}, data=fields)
    body = request.read()
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /v1/edits HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def serial_reference(seeds: list[int], png: bytes, fields: dict[str, str] = EDIT) -> dict[int, np.ndarray]:
    """The same edits run one after another in this process, on the runtime the server loads."""
    import torch

    from step1x_export.runtime import Step1XEditRuntime

    image = Image.open(io.BytesIO(png)).convert("RGB")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers under test (see env_with_worktree); the tiny edits are bit-identical
    try:
        with Step1XEditRuntime.load("tiny") as rt:
            return {s: np.asarray(rt.edit(image, fields["instruction"], seed=s, steps=int(fields["steps"]),
                                          size_level=int(fields["size_level"]))) for s in seeds}
    finally:
        torch.set_num_threads(threads)


def assert_same_edit(got: np.ndarray, expected: np.ndarray, seed: int) -> None:
    """A served edit is bit for bit the serial one, batched or not (tests/test_batching.py says why); another
    seed's edit differs by tens of levels."""
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() == 0, f"seed {seed} got another edit (largest difference {diff.max()} levels)"


@contextmanager
def in_process_server(spec, limits, keys=None) -> Iterator[tuple[str, object]]:
    """A real server on a loopback port, run by uvicorn in a thread of this process: the tests can reach its
    runtime (serial references on the very weights served) and patch what it imports. One torch thread, as
    the server processes (env_with_worktree)."""
    import threading

    import torch
    import uvicorn

    from step1x_export.serve import EditService, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    service = EditService(spec, limits)
    port = free_port()
    config = uvicorn.Config(create_app(service, keys=keys), host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="test-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 300)
        yield url, service
    finally:
        uv.should_exit = True
        thread.join(60)
        torch.set_num_threads(threads)
