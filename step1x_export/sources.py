"""Model sources by name: the small configs (`tiny`, `toy`, ...) that the runtime, the CLI and the tools accept
in place of a model folder. Trained weights of a small config ship inside the package; the others get seeded
random weights. This registry sits below the runtime and the CLI, so neither imports the toy model's training
code to resolve a name; it imports torch only when a model is built (the CLI's `--help` reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_text_atomic
from .instructions import KNOWN_TASKS_FILE, KnownTasks, known_tasks_json, read_known_tasks
from .step1x_ref.configs import CONFIGS, get_config

if TYPE_CHECKING:
    import torch

    from .step1x_ref.pipeline import Step1XEditPipeline

# Every small config: a name that stands for a model (never guessed from a path).
TINY = tuple(name for name, c in CONFIGS.items() if c.tiny_qwen is not None)
# Small configs whose trained weights ship inside the package, in the official layout. The v1.2 toy's folder
# holds its DiT + connector only: its VAE and MLLM are the toy's (its `shared.json` names that folder).
_TOY = Path(__file__).parent / "toy"
PACKAGED = {"toy": _TOY / "weights", "toy-v1.2": _TOY / "weights_v1p2"}
# The module that trains each packaged model's weights.
TRAINED_BY = {"toy": "step1x_export.toy.train", "toy-v1.2": "step1x_export.toy.v1p2_tune"}


def small_pipeline(name: str, *, seed: int = 0, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> Step1XEditPipeline:
    """A small model by config name: its shipped trained weights if the package has them, else random ones
    (`dtype` default: float32)."""
    import torch

    from .step1x_ref.pipeline import Step1XEditPipeline
    from .step1x_ref.weights.loading import CheckpointError

    dtype = torch.float32 if dtype is None else dtype
    if name not in PACKAGED:
        return Step1XEditPipeline.random(name, seed=seed, dtype=dtype)
    if not PACKAGED[name].is_dir():
        raise CheckpointError(f"the {name} weights are missing from {PACKAGED[name]}: "
                              f"train them with `python -m {TRAINED_BY[name]}`")
    return Step1XEditPipeline.from_pretrained(PACKAGED[name], config=get_config(name), dtype=dtype, device=str(device))


def weights_note(name: str, seed: int) -> str:
    if name in PACKAGED:
        return f"{name}: trained weights shipped in the package"
    return f"{name}: random weights (seed {seed})"


def known_tasks(source: str | Path | None) -> KnownTasks | None:
    """The tasks a model knows where it knows only a few (a packaged model by name, or what a model folder
    carries); None for a model that follows open instructions or, with random weights, none at all."""
    if source is None or str(source) in TINY and str(source) not in PACKAGED:
        return None
    folder = PACKAGED.get(str(source), Path(source))
    return read_known_tasks(folder) if folder.is_dir() else None


def save_known_tasks(folder: Path, known: KnownTasks | None) -> None:
    """`known` as `folder`'s known-tasks file, written atomically; None removes any file there, so a folder
    rewritten for a model of open instructions keeps no other model's list."""
    path = folder / KNOWN_TASKS_FILE
    if known is None:
        path.unlink(missing_ok=True)
    else:
        write_text_atomic(path, known_tasks_json(known.model, known.tasks))
