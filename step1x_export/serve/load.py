"""A bounded load generator for the edit service: N requests from C concurrent clients, latency percentiles.

Used by the capacity benchmark and the load tests. It refuses any host that is not a loopback address
unless told otherwise: a load test is for a server you run, not someone else's.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Reply:
    seed: int
    status: int
    seconds: float
    body: bytes
    headers: dict[str, str]
    attempts: int = 1  # > 1 when a server fault (5xx other than 503/504) was retried
    first_step_s: float | None = None  # streamed: when the first denoising step was reported


@dataclass
class LoadReport:
    replies: list[Reply]
    wall_s: float
    clients: int
    errors: list[str] = field(default_factory=list)  # transport failures (no HTTP answer at all)

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.status == 200]

    def percentile(self, q: float, of: str = "seconds") -> float:
        """Latency percentile (seconds) over the successful replies, nearest-rank; `of="first_step_s"`: the
        time to the first denoising step (streamed replies)."""
        times = sorted(t for r in self.ok if (t := getattr(r, of)) is not None)
        if not times:
            return float("nan")
        return times[max(0, math.ceil(q / 100 * len(times)) - 1)]

    def summary(self) -> dict[str, float | int]:
        ok = self.ok
        return {
            "requests": len(self.replies) + len(self.errors), "ok": len(ok), "clients": self.clients,
            "p50_s": round(self.percentile(50), 4), "p99_s": round(self.percentile(99), 4),
            "mean_s": round(statistics.fmean(r.seconds for r in ok), 4) if ok else float("nan"),
            "throughput_rps": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0, "wall_s": round(self.wall_s, 3),
            **({"first_step_p50_s": round(self.percentile(50, "first_step_s"), 4),
                "first_step_p99_s": round(self.percentile(99, "first_step_s"), 4)}
               if any(r.first_step_s is not None for r in ok) else {}),
        }


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"load target {url} is not a loopback address ({sorted(addresses)}); pass allow_remote=True "
                         "only for a server you run")


def free_port() -> int:
    """A TCP port free on the loopback interface now (for test and benchmark servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 600) -> list[int]:
    """Poll `url`/readyz until it answers 200; returns the statuses seen (503 while loading or warming)."""
    import httpx

    seen: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            seen.append(httpx.get(f"{url}/readyz", timeout=5).status_code)
            if seen[-1] == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout_s} s (statuses seen: {sorted(set(seen))})")


def run_load(url: str, image_png: bytes, seeds: list[int], *, clients: int, fields: dict[str, str],
             timeout_s: float = 120.0, allow_remote: bool = False, retries: int = 0,
             on_reply: Callable[[Reply], None] | None = None, stream: bool = False) -> LoadReport:
    """POST one edit per seed to `url` + /v1/edits from `clients` threads; every request has its own
    `timeout_s`, so the whole run is bounded by about len(seeds) / clients * timeout_s * (1 + retries).

    `retries`: a server fault (a 5xx other than 503 and 504, or a dropped connection: e.g. the replica died
    mid-edit) is sent again up to this many times; an edit is a pure function of its request (the seed
    included), so a retry cannot give another answer. `on_reply` sees each answer as it arrives. `stream`:
    ask for server-sent events and time the first step's report too (`Reply.first_step_s`)."""
    import httpx

    if not allow_remote:
        check_loopback(url)
    endpoint = url.rstrip("/") + "/v1/edits"
    errors: list[str] = []

    def post(client: httpx.Client, data: dict[str, str], t0: float) -> tuple[int, bytes, dict[str, str], float | None]:
        """One request: (status, body, headers, time to the first step's report or None)."""
        files = {"image": ("input.png", image_png, "image/png")}
        if not stream:
            r = client.post(endpoint, files=files, data=data)
            return r.status_code, r.content, dict(r.headers), None
        first, lines = None, []
        with client.stream("POST", endpoint, files=files, data={**data, "stream": "true"}) as r:
            for line in r.iter_lines():
                if first is None and line == "event: progress":
                    first = time.perf_counter() - t0
                lines.append(line)
        return r.status_code, "\n".join(lines).encode(), dict(r.headers), first

    def one(client: httpx.Client, seed: int) -> Reply | None:
        t0 = time.perf_counter()
        for attempt in range(1, retries + 2):
            try:
                status, body, headers, first = post(client, {**fields, "seed": str(seed)}, t0)
            except httpx.HTTPError as e:
                if attempt <= retries:
                    continue
                errors.append(f"seed {seed}: {type(e).__name__}: {e}")
                return None
            if status < 500 or status in (503, 504) or attempt > retries:
                return Reply(seed, status, time.perf_counter() - t0, body, headers, attempt, first)
        raise AssertionError("unreachable")

    def worker(chunk: list[int]) -> list[Reply]:
        replies = []
        with httpx.Client(timeout=timeout_s) as client:
            for seed in chunk:
                reply = one(client, seed)
                if reply is not None:
                    replies.append(reply)
                    if on_reply is not None:
                        on_reply(reply)
        return replies

    chunks = [seeds[i::clients] for i in range(clients)]  # interleaved: every client runs to the end
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        replies = [r for part in pool.map(worker, chunks) for r in part]
    return LoadReport(replies, time.perf_counter() - t0, clients, errors)
