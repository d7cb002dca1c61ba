"""Shared CLI pieces: atomic output, progress bars, error translation."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import torch
from PIL import Image
from tqdm import tqdm

from ..files import atomic_path
from ..runtime.trt_manifest import EngineMismatchError

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
# Every package error below is a ValueError (CheckpointError, ImageInputError, ExportError, ArtifactError,
# ProfileError); EngineMismatchError (a TensorRT engine built for another GPU/version) is a RuntimeError.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, EngineMismatchError)
# Modules of the optional extras (pyproject.toml): a command that needs one says which extra to install.
OPTIONAL_MODULES = {"onnx": "export", "onnxscript": "export", "onnxruntime": "ort", "tensorrt": "tensorrt",
                    "matplotlib": "dev"}


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's input errors into a one-line message and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                raise click.ClickException(str(e)) from e
            except ModuleNotFoundError as e:
                extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
                if extra is None:
                    raise
                raise click.ClickException(f"{e.name} is not installed; this needs the {extra!r} extra: "
                                           f"pip install 'step1x-export[{extra}]'") from e

    return wrapper


def check_output_path(path: Path, *, suffixes: dict[str, str] | None = None) -> None:
    """Fail before any work if the output cannot be written where asked."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"output {path}: unknown image type {path.suffix!r}; use one of {', '.join(suffixes)}")


def save_image(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=IMAGE_SUFFIXES[path.suffix.lower()])


@contextmanager
def step_progress(desc: str = "denoising", enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress callback (done, total) drawing a tqdm bar on stderr."""
    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
