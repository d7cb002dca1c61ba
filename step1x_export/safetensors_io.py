"""Streaming safetensors: read a checkpoint a few tensors at a time, write one tensor at a time.

`safe_open` maps the whole file, and every page a read touches stays in the process's resident set
until the file is closed: reading a 25 GB checkpoint through one `safe_open` ends with the whole file
resident. `TensorReader` opens the file per group of tensors (one layer), so the resident set holds
that group only. `safetensors.torch.save_file` serialises every tensor before writing (the whole
output twice in host memory); `StreamWriter` writes the header first (the shapes and dtypes are known
up front) and then each tensor's bytes as it is produced. The file format is the documented one:
8-byte little-endian header length, a JSON header (`dtype`, `shape`, `data_offsets` per tensor,
`__metadata__` strings), then the data; safetensors reads what this writes (the tests check it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .files import atomic_path

# safetensors dtype names <-> torch dtypes (the subset checkpoints of this model use).
DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
    torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_ALIGN = 8  # the header is padded so the data starts 8-byte aligned


class SafetensorsIOError(ValueError):
    """A safetensors file cannot be read, or a streamed write does not match its declared header."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorReader:
    """Tensors of one safetensors file, read group by group so the file is never resident as a whole."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path, self.device = Path(path), str(device)
        if not self.path.is_file():
            raise SafetensorsIOError(f"checkpoint {self.path} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata: dict[str, str] = f.metadata() or {}
                self.infos = {k: _info(f.get_slice(k)) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise SafetensorsIOError(f"cannot read {self.path} (truncated or not a safetensors file?): {e}") from e

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """These tensors (copies, on `device`); the file is closed again before returning."""
        try:
            with safe_open(str(self.path), framework="pt", device=self.device) as f:
                return {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as e:
            raise SafetensorsIOError(f"cannot read {self.path}: {e}") from e

    def read_all(self) -> dict[str, torch.Tensor]:
        return self.read(self.infos)


def _info(view) -> TensorInfo:  # a safe_open slice: dtype name + shape, no data read
    name = view.get_dtype()
    if name not in TORCH_DTYPES:
        raise SafetensorsIOError(f"tensor dtype {name} is not supported")
    return TensorInfo(TORCH_DTYPES[name], tuple(view.get_shape()))


def group_by_module(keys: Iterable[str]) -> dict[str, list[str]]:
    """{module name: its tensor keys}, in first-seen order (`a.b.weight`, `a.b.bias` -> `a.b`)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rpartition(".")[0], []).append(k)
    return groups


class StreamWriter:
    """Write tensors declared up front, one at a time, in declaration order; see `stream_safetensors`."""

    def __init__(self, file, entries: dict[str, TensorInfo]):
        self._file, self._entries = file, entries
        self._order = iter(entries.items())
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want = next(self._order, (None, None))
        if name != want_name:
            raise SafetensorsIOError(f"streamed tensor {name}: expected {want_name} next")
        got = TensorInfo(tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise SafetensorsIOError(f"streamed tensor {name}: declared {want}, got {got}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.written += 1


@contextmanager
def stream_safetensors(path: str | Path, entries: dict[str, TensorInfo],
                       metadata: dict[str, str] | None = None) -> Iterator[StreamWriter]:
    """A safetensors file at `path` whose tensors the block writes one by one (atomic: all or nothing)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, info in entries.items():
        header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        writer = StreamWriter(f, entries)
        yield writer
        if writer.written != len(entries):
            raise SafetensorsIOError(f"{path}: {writer.written} of {len(entries)} declared tensors were written")
