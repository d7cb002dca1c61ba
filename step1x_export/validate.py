"""Checks on everything a user hands in (numbers, devices, output paths) and on what the model hands back.

One place for the rules, shared by the command line, `Step1XEditRuntime.edit` and any server in front of
them: each check raises `InputError` (a ValueError) whose one-line message names the option and says what
was expected and what came. Numbers are checked where they enter, before any model work, so a bad
`cfg` cannot run a whole edit and write a black picture.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the checks that need it: the CLI's option types use this module
    import torch

# Inclusive ranges of the edit's numbers. CFG 0 is the unguided model; past ~30 the picture saturates and
# upstream never goes near 100. Seeds feed torch.Generator.manual_seed (64-bit); the pipeline also uses
# seed + 1, so the top is 2**63 - 1, far past any real use.
STEPS_RANGE = (1, 1000)
CFG_RANGE = (0.0, 100.0)
SIZE_LEVEL_RANGE = (16, 4096)
SEED_RANGE = (0, 2**63 - 1)
# Input pictures: an edit runs at about size_level^2 pixels and is resized back to the input's size, so a
# bigger picture only costs memory and comes back upscaled; the server refuses more by default too.
MAX_PIXELS = 16_000_000


class InputError(ValueError):
    """A value handed in by the user is the wrong type, not finite, or out of range."""


class NonFiniteError(ValueError):
    """A stage produced NaN or infinity: nothing is written from such a result."""


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi]; bools and floats with a fraction are refused."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {_show(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {_show(value)}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {_show(value)}")
    return int(value)


def check_float(name: str, value: object, lo: float, hi: float) -> float:
    """`value` as a finite float in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name} must be a number in [{lo:g}, {hi:g}], got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value}")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


def check_edit_numbers(*, steps: object, cfg: object, size_level: object, seed: object) -> None:
    """The numbers of one edit, each refused with its name before any model work."""
    check_int("steps", steps, *STEPS_RANGE)
    check_float("cfg", cfg, *CFG_RANGE)
    check_int("size_level", size_level, *SIZE_LEVEL_RANGE)
    check_int("seed", seed, *SEED_RANGE)


def check_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has: 'cpu', 'cuda' or 'cuda:N' for a visible GPU, 'mps' where present."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r}: no CUDA GPU is visible on this machine; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
        return parsed
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return parsed
    raise InputError(f"device {device!r}: {parsed.type} is not available here; use cpu or cuda")


def check_output_file(path: str | Path, *, suffixes: tuple[str, ...] | None = None, what: str = "output") -> Path:
    """Fail before any work if `path` cannot be written as a file: folder missing or read-only, a directory."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file name inside it")
    if not path.parent.is_dir():
        raise InputError(f"{what} folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} folder {path.parent} is not writable")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InputError(f"{what} {path}: unknown file type {path.suffix!r}; use one of {', '.join(suffixes)}")
    return path


def check_finite(stage: str, tensor: torch.Tensor) -> torch.Tensor:
    """Raise NonFiniteError naming `stage` if `tensor` holds NaN or infinity (one host sync per stage)."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{stage} produced {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}; "
                             "no image is written")
    return tensor


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
