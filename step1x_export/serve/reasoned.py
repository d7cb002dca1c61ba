"""v1.2's thinking and reflection over HTTP, and text-to-image: work that runs alone on the runtime.

A reasoned edit is several edits with MLLM generations between them (`Step1XEditRuntime.edit_reasoned`); a
generation has no input picture to share a batch's size with. Both run as one `SoloJob` on the worker
thread, admitted like any edit but counted as all the edits they may run (`Reasoning.edits`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..step1x_ref.mllm.reasoning import JUDGE_RETRIES
from .request import EditParams, bad_request

if TYPE_CHECKING:
    from PIL import Image

    from ..runtime import Step1XEditRuntime
    from ..runtime.batching import LatentFn
    from ..step1x_ref.mllm.reasoning import ReasonedEdit
    from ..step1x_ref.sampling import ProgressFn

MAX_REFLECT = 10  # rounds, as the command line's --reflect
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Reasoning:
    """think: the MLLM rewrites the instruction first; reflect: up to that many rounds of edit + judgement."""

    think: bool = False
    reflect: int = 0
    judge_retries: int = JUDGE_RETRIES  # attempts per judging step whose answer does not parse

    @property
    def edits(self) -> int:
        """The most edits it may run (what admission counts)."""
        return max(1, self.reflect)


def flag_field(form: Mapping[str, object], name: str) -> bool:
    raw = str(form.get(name) or "").strip().lower()
    if raw not in TRUE + FALSE:
        raise bad_request(f"{name} must be true or false, got {raw!r}")
    return raw in TRUE


def parse_reasoning(form: Mapping[str, object]) -> Reasoning | None:
    """The think / reflect / judge_retries fields; None when neither asks for anything (a plain edit)."""
    raw = str(form.get("reflect") or "0").strip()
    if not raw.isdigit() or int(raw) > MAX_REFLECT:
        raise bad_request(f"reflect must be an integer in [0, {MAX_REFLECT}] (rounds), got {raw!r}")
    retries = str(form.get("judge_retries") or JUDGE_RETRIES).strip()
    if not retries.isdigit() or not 1 <= int(retries) <= JUDGE_RETRIES:
        raise bad_request(f"judge_retries must be an integer in [1, {JUDGE_RETRIES}], got {retries!r}")
    reasoning = Reasoning(flag_field(form, "think"), int(raw), int(retries))
    return reasoning if reasoning.think or reasoning.reflect else None


def run_reasoned(runtime: Step1XEditRuntime, image: Image.Image, p: EditParams, reasoning: Reasoning,
                 progress: ProgressFn, latents: LatentFn | None) -> ReasonedEdit:
    """The reasoned edit; a runtime that cannot reason (not v1.2) raises ValueError (the client's 400)."""
    return runtime.edit_reasoned(image, p.instruction, think=reasoning.think, reflect=reasoning.reflect,
                                 judge_retries=reasoning.judge_retries, seed=p.seed,
                                 steps=p.steps, cfg=p.cfg, size_level=p.size_level,
                                 negative_prompt=p.negative_prompt, progress=progress, latents=latents)


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def reasoning_dict(reasoned: ReasonedEdit) -> dict[str, Any]:
    """What the response carries: the instruction the edits started from, every round's image with the
    judge's verdict and scores, which round was chosen, and every text the MLLM generated."""
    rounds: list[dict[str, Any]] = []
    for i, image in enumerate(reasoned.images):
        entry: dict[str, Any] = {"image_png_base64": png_base64(image)}
        if i < len(reasoned.judgements):
            j = reasoned.judgements[i]
            entry |= {"verdict": j.verdict, "score1": j.score1, "score2": j.score2, "rank": j.rank}
        rounds.append(entry)
    return {"instruction": reasoned.instruction, "best": reasoned.best, "rounds": rounds,
            "texts": [{"role": role, "text": text} for role, text in reasoned.texts]}
