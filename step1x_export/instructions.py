"""The instructions a model knows, where it knows only a few: data its model folder carries (`tasks.json`).

A model trained on a fixed set of edits (the toy) turns any other instruction into a picture that is no edit
at all. Its folder lists its tasks and the exact phrasings it learned, so the command line, the API and the
server can say so before the edit, naming the nearest tasks it does know. A folder without the file (the
published checkpoints, which follow open instructions) is never flagged.

    {"model": "toy", "tasks": {"black_and_white": ["make it black and white", ...], ...}}
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

KNOWN_TASKS_FILE = "tasks.json"
NEAREST = 2  # tasks named in a warning


class UnknownInstructionWarning(UserWarning):
    """An instruction that is none of the phrasings the model learned: its output is no meaningful edit."""


@dataclass(frozen=True)
class KnownTasks:
    """A model's tasks, each with the phrasings (English and Chinese) it was trained on."""

    model: str
    tasks: dict[str, tuple[str, ...]]

    def knows(self, instruction: str) -> bool:
        """True when `instruction` is one of the learned phrasings, exactly (surrounding spaces aside)."""
        return any(instruction.strip() in phrasings for phrasings in self.tasks.values())

    def nearest(self, instruction: str, n: int = NEAREST) -> list[tuple[str, str]]:
        """The `n` tasks whose phrasings read most like `instruction`: (task, its closest phrasing) each."""
        text = instruction.strip().casefold()

        def closest(phrasings: tuple[str, ...]) -> tuple[float, str]:
            return max((difflib.SequenceMatcher(None, text, p.casefold()).ratio(), p) for p in phrasings)

        ranked = sorted(((*closest(p), task) for task, p in self.tasks.items()), reverse=True)
        return [(task, phrasing) for _, phrasing, task in ranked[:n]]

    def warning(self, instruction: str) -> str | None:
        """One line for an instruction the model did not learn (None for one it did)."""
        if self.knows(instruction):
            return None
        near = ", ".join(f"{phrasing!r} ({task})" for task, phrasing in self.nearest(instruction))
        return (f"instruction {instruction!r} is not one the {self.model} model learned, so its output will be no "
                f"real edit; it knows {len(self.tasks)} tasks (`step1x-export models` lists their phrasings), "
                f"nearest: {near}")

    def text_to_image_warning(self) -> str:
        """One line for text-to-image on this model: it learned edits of an input image, never pictures from text."""
        return (f"the {self.model} model learned only {len(self.tasks)} edits of an input image (`step1x-export "
                "models` lists them), never pictures from text: text-to-image makes no real picture")


def read_known_tasks(folder: Path) -> KnownTasks | None:
    """The known tasks a model folder carries, or None where it carries none (every instruction is open)."""
    path = folder / KNOWN_TASKS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tasks = {str(name): tuple(str(p) for p in phrasings) for name, phrasings in data["tasks"].items()}
        model = str(data.get("model", folder.name))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a known-tasks file ({type(e).__name__}: {e}); expected "
                         '{"model": NAME, "tasks": {TASK: [PHRASING, ...], ...}}') from None
    if not tasks or not all(tasks.values()):
        raise ValueError(f"{path}: every task needs at least one phrasing, got {tasks}")
    return KnownTasks(model, tasks)


def known_tasks_json(model: str, tasks: dict[str, tuple[str, ...]]) -> str:
    """The file a model folder carries for these tasks (what `read_known_tasks` reads)."""
    return json.dumps({"model": model, "tasks": {k: list(v) for k, v in tasks.items()}}, ensure_ascii=False,
                      indent=1) + "\n"
