"""Bookkeeping of the device checks (`benchmarks/device_checks.py`): entries with a status and figures,
saved atomically after each one, a time budget, and the short table printed last.

A check that raises becomes a `failed` entry with its error (the run goes on); one that would start with
less than its estimated time left is `skipped: budget`; one given a `limit_s` that runs past it is stopped
(`timed out`, a SIGALRM in the main thread: it lands when the current Python op returns). The entry is in the
JSON from its start (`running`), and `partial` saves what a check has so far, so a run killed from outside
still leaves every finished figure on disk.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .measure import short_error
from .report import write_text_atomic

SKIP_CUDA = "skipped: needs CUDA"


class StepTimeout(BaseException):
    """A check ran past its own time limit (not an Exception: the check's own handlers must not swallow it)."""
SUMMARY_KEYS = ("eager_ms_step", "default_ms_step", "speedup", "rel_diff", "compiles", "graphs_captured",
                "graphs_evicted", "peak_mem_gb", "mllm", "median_ms", "rel_err_vs_bf16", "kernels", "export_s",
                "max_rel_err", "rel_err", "error")


def log(msg: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)


def script_device(asked: str, full_size: bool) -> torch.device | str:
    """The device a GPU script runs on ("auto": CUDA when there is one), or why it cannot run (a message)."""
    cuda = torch.cuda.is_available()
    if asked == "cuda" and not cuda:
        return "--device cuda but no CUDA device"
    device = torch.device("cuda" if asked == "cuda" or (asked == "auto" and cuda) else "cpu")
    if device.type == "cpu" and full_size:
        return "full-size runs need a GPU: use --model tiny --device cpu for a dry run"
    return device


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class CheckReport:
    """Entries {name, status, elapsed_s, ...figures}, saved atomically after each one."""

    def __init__(self, path: Path, env: dict[str, str], config: dict[str, Any], start: float, budget_s: float):
        self.path, self.start, self.budget_s = path, start, budget_s
        self.data: dict[str, Any] = {"env": env, "config": config, "entries": [], "notes": []}
        self.current: dict[str, Any] | None = None

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 0.0,
            limit_s: float | None = None) -> dict[str, Any]:
        """Run one entry unless fewer than `need_s` seconds of the budget are left (stopped after `limit_s`);
        record and save it."""
        entry: dict[str, Any] = {"name": name}
        self.data["entries"].append(entry)
        if self.left_s() < need_s:
            entry["status"] = f"skipped: budget ({self.left_s():.0f} s left, needs ~{need_s:.0f} s)"
        else:
            log(f"{name} ...", self.start)
            t0 = time.monotonic()
            entry["status"] = "running"
            self.current = entry
            self.save()
            try:
                with time_limit(limit_s):
                    entry.update(fn())
                entry["status"] = entry.get("status") if entry.get("status") != "running" else "ok"
            except StepTimeout:
                entry["status"], entry["error"] = f"timed out ({limit_s:.0f} s)", f"stopped after {limit_s:.0f} s"
            except Exception as err:  # one failure must not cost the whole device call
                traceback.print_exc()
                entry["status"], entry["error"] = "failed", short_error(err)
            finally:
                self.current = None
            entry["elapsed_s"] = round(time.monotonic() - t0, 2)
        log(f"{name}: {entry['status']}", self.start)
        self.save()
        return entry

    def partial(self, **figures: Any) -> None:
        """Figures of the running entry so far, saved at once (a cell of a long check)."""
        if self.current is not None:
            self.current.update(figures)
            self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, default=_jsonable))


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise StepTimeout in the main thread after `seconds` (None, or off the main thread: no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise StepTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _jsonable(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype | torch.device | Path):
        return str(value)
    return repr(value)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(entries: list[dict[str, Any]]) -> str:
    lines = [f"{'check':<30} {'status':<34} figures", "-" * 110]
    for e in entries:
        figures = ", ".join(f"{k}={_fmt(e[k])}" for k in SUMMARY_KEYS if e.get(k) is not None)
        lines.append(f"{e['name']:<30} {e['status'][:34]:<34} {figures}")
        for r in e.get("rows", []):
            errs = ", ".join(f"{k.replace('rel_err_', '')}={_fmt(v)}" for k, v in r.items() if k.startswith("rel_err"))
            lines.append(f"{'':<4}{r['format']:<9}{r['weights']:<12}{r['kernel']:<10}{r['status'][:20]:<21}{errs}")
    return "\n".join(lines)
