"""Content hashes that tie artifacts (exports, quantization scales) to the weights they came from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

_CHUNK = 1 << 24


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def module_hash(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry, in key order.

    Independent of device; depends on dtype, so hash the model in the dtype it is shipped in.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":
            raise ValueError(f"cannot hash {name}: it is on the meta device (load weights first)")
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())  # the buffer itself, no extra copy
    return h.hexdigest()
