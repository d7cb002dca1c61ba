"""Export and engine folders are untrusted input: read them as a hostile stranger may have written them.

A folder arrives by copy, download or shared disk, and its JSON names the files to load. The rules:
- every file a manifest names resolves inside the folder: no absolute path, no `..`, no symlink out;
- every file that will be read is listed with its sha256, and the checksum is verified before any
  parser (protobuf, TensorRT, transformers) sees the bytes;
- the JSON itself is bounded in size, free of NaN/Infinity, and checked against a schema (jsonschema)
  before any field is used.
Anything else is refused with one line naming the file and the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .hashing import file_sha256

MAX_JSON_BYTES = 16 * 1024 * 1024  # a manifest of five components is a few kB
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
FILE_NAME = {"type": "string", "minLength": 1, "maxLength": 255}


class UntrustedFileError(ValueError):
    """A folder (export, engines) or a file it names cannot be trusted: outside, unlisted, changed, malformed."""


Refusal = type[UntrustedFileError]  # the error class a caller wants (ExportError, EngineFolderError, ...)


def member(root: Path, name: object, *, error: Refusal = UntrustedFileError) -> Path:
    """`root / name`, refusing any name that is not a plain relative path ending inside `root` (links resolved)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise error(f"{root}: file name {name!r} is not a relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise error(f"{root}: file name {name!r} points outside the folder (absolute path or '..')")
    path = root / pure
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise error(f"{path} is a link to {target}, outside the folder {root}")
    return path


def read_json(path: Path, *, error: Refusal = UntrustedFileError) -> object:
    """Parse a bounded JSON file; NaN, Infinity and numbers too large for a float are refused."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path} is {size} bytes; a manifest is at most {MAX_JSON_BYTES} bytes")
    return parse_json(path.read_bytes(), str(path), error=error)


def parse_json(text: str | bytes, source: str, *, error: Refusal = UntrustedFileError) -> object:
    """`json.loads` that refuses NaN, Infinity and out-of-range numbers, with one line naming `source`."""

    def no_constant(name: str) -> float:
        raise ValueError(f"{name} is not a number a manifest may hold")

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"number {text[:20]} is out of range")
        return value

    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise error(f"{source} is not valid JSON: {_clip(str(err) or type(err).__name__)}") from None


def check_schema(data: object, schema: Mapping, source: str | Path, *, error: Refusal = UntrustedFileError) -> None:
    """Refuse `data` unless it matches the JSON schema; the message names the field (`$.components.dit.file`)."""
    problem = best_match(Draft202012Validator(schema).iter_errors(data))
    if problem is not None:
        raise error(f"{source}: {problem.json_path}: {_clip(problem.message)}")


def verify_files(root: Path, files: Mapping[str, str], where: str, *, error: Refusal = UntrustedFileError,
                 hint: str = "") -> None:
    """Every listed file exists inside `root` and has its listed sha256 (read once, before any parser)."""
    for name, digest in files.items():
        path = member(root, name, error=error)
        if not path.is_file():
            raise error(f"{where}: file {name} is missing{hint}")
        if file_sha256(path) != digest:
            raise error(f"{where}: {name} changed since it was written (sha256 mismatch){hint}")


def check_no_unlisted(root: Path, subdir: str, listed: Iterable[str], where: str, *,
                      error: Refusal = UntrustedFileError) -> None:
    """Every file under `root/subdir` is listed: a library reading that folder reads only verified bytes."""
    listed = set(listed)
    base = member(root, subdir, error=error)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in (*dirnames, *filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise error(f"{where}: {rel} is a link; the folder must hold plain files")
            if full.is_file() and rel not in listed:
                raise error(f"{where}: {rel} is not listed with a checksum; remove it or re-export")


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
