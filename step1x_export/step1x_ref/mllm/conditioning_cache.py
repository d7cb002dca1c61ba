"""The MLLM's conditioning kept on disk, so an edit tried again skips the MLLM.

Edits are tried: the same photo and instruction again with another seed, step count or guidance. The MLLM's
output depends on none of those, and producing it is the edit's most expensive part to set up: loading
Qwen2.5-VL (15 GB for the published model; on CPU, importing transformers' Qwen2.5-VL modules alone takes
longer than a whole toy edit). A pipeline loaded from a model folder looks its conditioning up here first and
loads the MLLM only on a miss.

A key names everything the conditioning depends on: the MLLM's files (sha256 of each), the embedder's settings,
dtype and device type, the code that turns the MLLM's states into conditioning, transformers' version, the
texts, and the image as the MLLM receives it (mode, size, pixels). Entries are safetensors files (no pickle),
written atomically; an entry that cannot be read is recomputed and written again. The folder is
`$STEP1X_EXPORT_CACHE/conditioning` when that is set (`off` turns the cache off), else
`$XDG_CACHE_HOME/step1x-export/conditioning` (`~/.cache/...`).

A model folder may also ship entries of its own (`conditioning/` beside the weights, read-only): the toy ships
its demo's, so `step1x-export demo` on a fresh machine does not wait seconds for transformers' imports before an
edit that takes half a second. Shipped entries are keyed like the others but without the library versions (they
were made by whoever trained the model, with theirs); the suite recomputes the toy's with the installed ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...hashing import file_identity, file_sha256
from ..configs import EmbedderParams

CACHE_ENV = "STEP1X_EXPORT_CACHE"
SHIPPED_CONDITIONING_DIR = "conditioning"  # in a model folder: the entries it ships
OFF = ("off", "0", "none", "")
FORMAT = 1
# The code between the MLLM's hidden states and the conditioning: a change to it is a new key.
CODE = ("conditioner.py", "qwen_processor.py", "prompt_prefix.py")
HASHED_DIRECTLY = 64 << 20  # smaller files are hashed at every load; larger ones through their cached identity


def cache_folder() -> Path | None:
    """Where entries live, or None when `$STEP1X_EXPORT_CACHE` is `off`."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value) / "conditioning"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "step1x-export" / "conditioning"


def _file_digest(path: Path) -> str:
    return file_sha256(path) if path.stat().st_size <= HASHED_DIRECTLY else file_identity(path).sha256


def _code_digest() -> str:
    h = hashlib.sha256()
    for name in CODE:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


@dataclass(frozen=True)
class ConditioningCache:
    """Conditioning entries of one MLLM (the Qwen files in `mllm_folders`, read with `params` in `dtype` on a
    `device_type` device) in `folder`."""

    folder: Path
    mllm_folders: tuple[Path, ...]
    params: EmbedderParams
    dtype: torch.dtype
    device_type: str
    shipped: Path | None = None  # the model folder's own entries (read-only), when it ships some

    @classmethod
    def for_mllm(cls, folders: list[Path], params: EmbedderParams, dtype: torch.dtype,
                 device: torch.device, shipped: Path | None = None) -> ConditioningCache | None:
        """The cache of the MLLM in `folders` (its weights folder, and the processor's where it lives apart),
        reading `shipped` entries too; None when the cache is off."""
        folder = cache_folder()
        return None if folder is None else cls(folder, tuple(folders), params, dtype, device.type, shipped)

    @cached_property
    def _maker(self) -> dict:
        """Who makes the conditioning, library versions aside. Computed at the first lookup, not at load: it
        hashes the MLLM's files (15 GB for the published model, once per file thanks to the identity cache),
        which a pipeline that never edits (export, calibrate, save) should not pay."""
        files = sorted({p for d in self.mllm_folders for p in Path(d).iterdir() if p.is_file()})
        return {
            "format": FORMAT,
            "files": [[p.name, _file_digest(p)] for p in files],
            "params": dataclasses.asdict(self.params),
            "dtype": str(self.dtype),
            "device": self.device_type,
            "code": _code_digest(),
        }

    @cached_property
    def identity(self) -> str:
        """The key of this machine's entries: the maker with the versions of the libraries that run it."""
        return _digest({**self._maker, "transformers": _version("transformers"), "torch": torch.__version__})

    @cached_property
    def shipped_identity(self) -> str:
        return _digest(self._maker)

    def path(self, texts: list[str], image: Image.Image) -> Path:
        return self.folder / _entry_name(self.identity, texts, image)

    def shipped_path(self, texts: list[str], image: Image.Image) -> Path | None:
        return None if self.shipped is None else self.shipped / _entry_name(self.shipped_identity, texts, image)

    def lookup(self, texts: list[str], image: Image.Image) -> tuple[tuple[torch.Tensor, ...], Path] | None:
        """The stored conditioning and the entry it came from (this machine's first, then the shipped one), or
        None (no entry, or none that can be read)."""
        for path in (self.path(texts, image), self.shipped_path(texts, image)):
            if path is not None and (tensors := _read_entry(path)) is not None:
                return tensors, path
        return None

    def load(self, texts: list[str], image: Image.Image) -> tuple[torch.Tensor, ...] | None:
        found = self.lookup(texts, image)
        return None if found is None else found[0]

    def store(self, texts: list[str], image: Image.Image, outputs: object) -> None:
        """Keep `outputs` when they are tensors (the v1.0 / v1.1 embedders' (embedding, mask)); a cache that
        cannot be written costs the next edit time, never this one."""
        if _storable(outputs):
            with contextlib.suppress(OSError):
                _write_entry(self.path(texts, image), outputs)

    def ship(self, texts: list[str], image: Image.Image, outputs: tuple[torch.Tensor, ...]) -> Path:
        """Write `outputs` as an entry shipped with the model (into `shipped`); errors are raised."""
        path = self.shipped_path(texts, image)
        if path is None or not _storable(outputs):
            raise ValueError("ship() needs a `shipped` folder and the (embedding, mask) tensors of an embedder")
        _write_entry(path, outputs)
        path.chmod(0o644)  # a package's file, read by whoever installs it
        return path


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _entry_name(identity: str, texts: list[str], image: Image.Image) -> str:
    h = hashlib.sha256(identity.encode())
    h.update(json.dumps({"texts": texts, "mode": image.mode, "size": image.size}).encode())
    h.update(image.tobytes())
    return f"{h.hexdigest()}.safetensors"


def _storable(outputs: object) -> bool:
    return isinstance(outputs, tuple | list) and all(isinstance(t, torch.Tensor) for t in outputs)


def _read_entry(path: Path) -> tuple[torch.Tensor, ...] | None:
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    if sorted(tensors) != [str(i) for i in range(len(tensors))]:
        return None
    return tuple(tensors[str(i)] for i in range(len(tensors)))


def _write_entry(path: Path, outputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
    """Atomically: a reader sees the whole entry or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(outputs)}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
