"""Content hashes that tie artifacts (exports, quantization scales) to the weights they came from."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import write_text_atomic

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


# -- checkpoint identity without re-reading the file at every load --------------------------------------------
IDENTITY_SUFFIX = ".sha256.json"


@dataclass(frozen=True)
class FileIdentity:
    """Who a checkpoint file is: its name, size and sha256 (computed once, then cached).

    The cache (`<file>.sha256.json` beside the file, or in the user cache folder when that folder is
    read-only) records the size and mtime (ns) the digest was computed at; a file whose size or mtime
    differs is hashed again. That is safe against every ordinary way a checkpoint changes (a new
    download, a copy, an in-place rewrite all move the mtime); what it does not catch is a deliberate
    rewrite that restores the old mtime, the same trust `make` and `rsync` place in it.
    """

    name: str
    size: int
    sha256: str

    def as_dict(self) -> dict:
        return {"file": self.name, "size": self.size, "sha256": self.sha256}


def file_identity(path: str | Path, *, cache_dir: Path | None = None) -> FileIdentity:
    path = Path(path)
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    for cache in _cache_files(path, cache_dir):
        try:
            cached = json.loads(cache.read_text())
            if {k: cached.get(k) for k in stamp} == stamp and len(cached.get("sha256", "")) == 64:
                return FileIdentity(path.name, stat.st_size, cached["sha256"])
        except (OSError, ValueError):
            continue
    digest = file_sha256(path)
    for cache in _cache_files(path, cache_dir):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache, json.dumps(stamp | {"sha256": digest}))
            break
        except OSError:
            continue  # a read-only model folder: try the user cache
    return FileIdentity(path.name, stat.st_size, digest)


def _cache_files(path: Path, cache_dir: Path | None) -> list[Path]:
    user = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "step1x-export" / "identity"
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return [path.with_name(path.name + IDENTITY_SUFFIX), user / f"{key}-{path.name}{IDENTITY_SUFFIX}"]
