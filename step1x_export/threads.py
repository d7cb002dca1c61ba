"""How many CPU threads torch's operators use during an edit, scoped to the edit.

torch's default is one OpenMP thread per core. That suits one large model alone on a machine; it does not
suit a small model's tiny operators, nor a machine other work shares: OpenMP threads spin-wait for each other
at every operator, and a thread whose core is taken holds all the others up. On this project's shared 2-core
EPYC, with two busy processes beside it, the toy's 28 denoising steps took 139 s with two threads and 4.1 s with
one (medians of 5; docs/design.md, "CPU threads", has the table, the load and the command).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

SMALL_MODEL_THREADS = 1  # the small configs' operators are too small to share among threads


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as `taskset` or a container's cpuset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(value: object) -> int | None:
    """`value` as a thread count >= 1, or None (the default); anything else is a ValueError naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"threads must be an integer >= 1 (CPU threads per edit) or None, got {value!r}")
    return value


def default_threads(*, small_model: bool, device_type: str) -> int | None:
    """The thread count an edit uses when none is asked: one for a small model on the CPU, else torch's own
    (None: one per core, what a large model on a machine of its own wants; on a GPU the CPU only feeds it)."""
    return SMALL_MODEL_THREADS if small_model and device_type == "cpu" else None


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block (None: left as it is), then restored."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
