"""v1.2's thinking and reflection around any edit function, as the published thinker pipeline runs them.

Thinking: the MLLM rewrites the instruction (seeing the image) before the edit.
Reflection, up to N rounds: edit -> the MLLM judges the result against the (possibly rewritten)
instruction: a description of the intended target, a consistency score (capped by its counts), a
verdict `<#Think>... <#Success>` / `<#Reflection> new instruction` / `<#Failed>`, and two scores
(edit success and non-overediting; naturalness and artifacts). Success ends the loop; a reflection
edits the *result* again with the new instruction; anything else restarts from the input. The round
with the best min(score1) x min(score2) wins (ties: a successful round, else the later one).

Every generated text is kept, in order, with its role, for the caller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .generation import Content
from .reasoning_prompts import PROMPTS

Generate = Callable[[str, list[Content]], str]  # (system, user content) -> text
EditFn = Callable[[Image.Image, str], Image.Image]
JUDGE_RETRIES = 20  # the published pipeline's attempts per judging step before it gives up
VERDICT_TAGS = ("<#Reflection>", "<#Failed>", "<#Success>", "<#Others>")
FAILED_VERDICT = "<#Think> The process encountered repeated errors and could not complete.<#Failed>"


def language(text: str) -> str:
    """'中文' if the text has more than one CJK character, else '英文' (the prompts' language words)."""
    return "中文" if len(re.findall(r"[\u4e00-\u9fff]", text)) > 1 else "英文"


def capped_score(obj: dict[str, Any]) -> dict[str, Any]:
    """The consistency judgement's score, capped by its verdict and counts (raises on malformed fields)."""
    meets = str(obj.get("meets_instruction", "")).strip().lower()
    major = int(obj.get("major_conflicts", 0) or 0)
    hallucinations = int(obj.get("hallucinations", 0) or 0)
    omissions = int(obj.get("omissions", 0) or 0)
    raw = float(obj.get("raw_score", 0))
    raw = max(0.0, min(10.0, raw * 10.0 if 0 <= raw <= 1.0000001 else raw))
    cap = {"no": 2.0, "partial": 5.0}.get(meets, 10.0)
    cap = min(cap, 5.0 if major >= 2 else 8.0 if major == 1 else 10.0)
    if hallucinations > 0 or omissions > 0:
        cap = min(cap, 7.0)
    if meets != "yes" or major > 0 or hallucinations > 0 or omissions > 0:
        cap = min(cap, 8.99)
    return {"score": float(f"{min(raw, cap):.4f}"), "raw_score": raw, "reason": str(obj.get("reason", "")).strip()}


def parse_consistency(text: str) -> dict[str, Any]:
    match = re.search(r"\{.*\}", text, flags=re.S)
    if match is None:
        raise ValueError("no JSON object")
    return capped_score(json.loads(match.group(0)))


def parse_verdict(text: str) -> str:
    """The verdict from <#Think> on; exactly one of the tags, once, after <#Think>."""
    think = text.find("<#Think>")
    present = [tag for tag in VERDICT_TAGS if tag in text]
    if think < 0 or len(present) != 1 or text.count(present[0]) > 1 or text.find(present[0]) < think:
        raise ValueError("not a verdict")
    return text[think:].strip()


def parse_scores(text: str) -> dict[str, Any]:
    """{"score": [...], "reasoning": ...}, optionally in a ``` or ```json fence."""
    content = text.strip()
    if content.startswith("```json"):
        content = content[7:-3].strip()
    elif content.startswith("```"):
        content = content[3:-3].strip()
    obj = json.loads(content)
    if not (isinstance(obj, dict) and "reasoning" in obj and isinstance(obj.get("score"), list)):
        raise ValueError("no score list")
    return obj


def read_verdict(verdict: str) -> tuple[bool, str | None]:
    """(success, new instruction or None) of a verdict."""
    valid = verdict.startswith("<#Think>") and verdict.count("<#Think>") == 1
    if not valid or sum(verdict.count(tag) for tag in VERDICT_TAGS) != 1:
        return False, None
    if "<#Reflection>" in verdict:
        return False, verdict.split("<#Reflection>")[1]
    return "<#Success>" in verdict or "<#Others>" in verdict, None


@dataclass
class Judgement:
    """One reflection round: the MLLM's verdict on an edit and its two score lists."""

    verdict: str
    score1: dict[str, Any]
    score2: dict[str, Any]

    @property
    def rank(self) -> float:
        """min(score1) x min(score2); a non-numeric or empty score list counts 0 (upstream would raise)."""
        return _min_score(self.score1) * _min_score(self.score2)


def _min_score(obj: dict[str, Any]) -> float:
    try:
        return float(min(float(s) for s in obj["score"]))
    except (TypeError, ValueError, KeyError):
        return 0.0


@dataclass
class Judge:
    """The MLLM's judging steps with upstream's retries; `texts` collects every generated text."""

    generate: Generate
    retries: int = JUDGE_RETRIES
    texts: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, role: str, prompt: str, content: list[Content], values: dict[str, Any]) -> str:
        system, user = PROMPTS[prompt]
        text = self.generate(system.substitute(values), _fill(content, user.substitute(values)))
        self.texts.append((role, text))
        return text

    def attempt(self, role: str, prompt: str, content: list[Content], values: dict[str, Any], parse):
        for _ in range(self.retries):
            try:
                return parse(self.ask(role, prompt, content, values))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
        return None

    def think(self, image: Image.Image, instruction: str) -> str:
        values = {"instruction": instruction, "language": language(instruction)}
        return self.ask("think", "think", [image, None], values).strip()

    def judge(self, source: Image.Image, edited: Image.Image, instruction: str) -> Judgement:
        values = {"instruction": instruction, "language": language(instruction)}
        verdict = FAILED_VERDICT
        description = self.attempt("describe", "describe", [source, None], values, _not_error)
        if description is not None:
            described = values | {"description": description}
            consistency = self.attempt("consistency", "consistency", [None, edited], described, parse_consistency)
            if consistency is not None:
                prior = {"prior_score": consistency["score"], "prior_reason": consistency["reason"]}
                verdict = self.attempt("reflect", "reflect", [source, edited, None], values | prior,
                                       parse_verdict) or FAILED_VERDICT
        failed = {"score": [0, 0], "reasoning": "evaluation failed"}
        score1 = self.attempt("score1", "score1", [source, edited, None], values, parse_scores) or failed
        score2 = self.attempt("score2", "score2", [edited, None], values, parse_scores) or failed
        return Judgement(verdict, score1, score2)


def _fill(content: list[Content | None], text: str) -> list[Content]:
    """The user turn: `None` marks where the prompt's text goes among the images."""
    return [text if c is None else c for c in content]


def _not_error(text: str) -> str:
    if text.startswith("错误:"):
        raise ValueError("the MLLM answered with an error")
    return text.strip()


@dataclass
class ReasonedEdit:
    """The chosen image, every round's image and judgement, and every text the MLLM generated."""

    image: Image.Image
    instruction: str  # what the edits started from (the rewritten one with thinking)
    images: list[Image.Image]
    judgements: list[Judgement]
    best: int
    texts: list[tuple[str, str]]  # (role, text): think, describe, consistency, reflect, score1, score2


def best_round(judgements: list[Judgement]) -> int:
    best, best_rank, best_success = 0, -1.0, False
    for i, j in enumerate(judgements):
        success = "<#Success>" in j.verdict
        if j.rank > best_rank:
            best, best_rank, best_success = i, j.rank, success
        elif j.rank == best_rank and (success or not best_success):
            best, best_success = i, best_success or success
    return best


def reasoned_edit(edit: EditFn, generate: Generate, image: Image.Image, instruction: str, *, think: bool,
                  reflect: int, retries: int = JUDGE_RETRIES) -> ReasonedEdit:
    """Thinking (optional) and up to `reflect` rounds of edit + judgement around `edit`; `reflect` 0 edits once."""
    if reflect < 0:
        raise ValueError(f"reflect must be >= 0 rounds, got {reflect}")
    judge = Judge(generate, retries)
    prompt = judge.think(image, instruction) if think else instruction
    if reflect == 0:
        out = edit(image, prompt)
        return ReasonedEdit(out, prompt, [out], [], 0, judge.texts)
    images: list[Image.Image] = []
    judgements: list[Judgement] = []
    source, current = image, prompt
    while len(judgements) < reflect:
        out = edit(source, current)
        verdict = judge.judge(image, out, prompt)
        images.append(out)
        judgements.append(verdict)
        success, refined = read_verdict(verdict.verdict)
        if success:
            break
        source, current = (out, refined) if refined is not None else (image, prompt)
    best = best_round(judgements)
    return ReasonedEdit(images[best], prompt, images, judgements, best, judge.texts)
