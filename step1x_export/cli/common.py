"""Shared CLI pieces: checked option types, atomic output, progress bars, error translation, Ctrl-C.

The command modules import torch, transformers, onnx and the model code only inside their commands: the
group and every `--help` are built from plain data (`step1x_export.choices`, the configs) and answer at once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..files import atomic_path
from ..step1x_ref.configs import CONFIGS
from ..validate import CFG_RANGE, SEED_RANGE, InputError, check_device, check_float, check_output_file

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Small models chosen by name: `toy` and `toy-v1.2` have trained weights shipped in the package, the `tiny` ones
# random weights.
SMALL_MODELS = ("toy", "toy-v1.2", "tiny", "tiny-v1.0", "tiny-v1.2")
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
# Every package error below is a ValueError (CheckpointError, ImageInputError, ExportError, ArtifactError,
# ProfileError, InputError, NonFiniteError); EngineMismatchError (a TensorRT engine built for another
# GPU/version, a RuntimeError) is added by `user_error_types` once an error is raised.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
# Modules of the optional extras (pyproject.toml): a command that needs one says which extra to install.
OPTIONAL_MODULES = {"onnx": "export", "onnxscript": "export", "onnxruntime": "ort", "tensorrt": "tensorrt",
                    "matplotlib": "dev"}
INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


class Step1XGroup(click.Group):
    """The command group: Ctrl-C ends any command with exit code 130 and one line (atomic writes and the
    export's temp files are removed on the way out, so nothing half-written is left)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted: stopped before finishing; no partial output was written", err=True)
            ctx.exit(INTERRUPTED)


class FiniteFloat(click.ParamType):
    """A float option that must be finite and within [lo, hi] (click's FloatRange lets NaN through)."""

    name = "float"

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            raw = value
        else:
            try:
                raw = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return check_float("value", raw, self.lo, self.hi)
        except InputError as err:
            self.fail(str(err).removeprefix("value "), param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"FLOAT {self.lo:g}..{self.hi:g}"


class DeviceType(click.ParamType):
    """A torch device this machine has (`cpu`, `cuda`, `cuda:N`): checked before any model work."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return str(check_device(value))
        except InputError as err:
            self.fail(str(err), param, ctx)


CFG = FiniteFloat(*CFG_RANGE)
SEED = click.IntRange(*SEED_RANGE)
DEVICE = DeviceType()


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
            except RuntimeError as e:
                from ..runtime.engines.trt_manifest import EngineMismatchError  # the command already loaded the runtime

                if isinstance(e, EngineMismatchError):
                    raise click.ClickException(str(e)) from e
                raise
            except ModuleNotFoundError as e:
                extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
                if extra is None:
                    raise
                raise click.ClickException(f"{e.name} is not installed; this needs the {extra!r} extra: "
                                           f"pip install 'step1x-export[{extra}]'") from e

    return wrapper


def check_output_path(path: Path, *, suffixes: dict[str, str] | None = None) -> None:
    """Fail before any work if the output cannot be written where asked (folder missing, a directory, ...)."""
    check_output_file(path, suffixes=tuple(suffixes) if suffixes is not None else None)


def save_image(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=IMAGE_SUFFIXES[path.suffix.lower()])


@contextmanager
def step_progress(desc: str = "denoising", enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress callback (done, total) drawing a tqdm bar on stderr."""
    from tqdm import tqdm

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
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` choice (`choices.DTYPES`)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def version_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--version`: the model config of the checkpoint in --model-dir (any registered config name)."""
    return click.option(
        "--version", type=click.Choice(list(CONFIGS)), default=None,
        help="Model version (config) of the checkpoint in --model-dir [default: what a diffusers-layout folder's "
             "model_index.json says, else v1.1]. v1.0-first-release = v1.0 as first released (no CFG rescale, "
             "BICUBIC input resize, unscaled refiner timestep), for reproducing old results.")


def lora_option(when: str, dest: str = "lora_specs") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--lora FILE[:SCALE]` (repeatable) into `dest`; `when` says where the merge happens."""
    return click.option(
        "--lora", dest, multiple=True, metavar="FILE[:SCALE]",
        help=f"LoRA (kohya format, from upstream's fine-tuning scripts) merged into the DiT's weights {when}, scaled "
             "by SCALE (default 1.0); repeatable, merged in order.")
