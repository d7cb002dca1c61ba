"""v1.2 thinking and reflection: the loop, the judging and the best-round choice of the published thinker
(`pipeline_step1x_edit_thinker.py` and `pipeline_step1x_edit_v1p2.py` on `Peyton-Chen/diffusers@step1xedit_v1p2`),
with a scripted MLLM; then the CLI with the tiny random MLLM generating (gibberish, seeded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli import main
from step1x_export.step1x_ref.mllm.reasoning import (
    FAILED_VERDICT,
    Judgement,
    best_round,
    capped_score,
    language,
    read_verdict,
    reasoned_edit,
)
from step1x_export.step1x_ref.mllm.reasoning_prompts import PROMPTS


def scores(a: float, b: float) -> str:
    return json.dumps({"score": [a, b], "reasoning": "r"})


CONSISTENT = json.dumps({"meets_instruction": "yes", "raw_score": 9, "reason": "ok"})


class Script:
    """A fake MLLM answering from a list, recording (system, content) of each call."""

    def __init__(self, answers: list[str]):
        self.answers, self.calls = list(answers), []

    def __call__(self, system: str, content: list) -> str:
        self.calls.append((system, content))
        return self.answers.pop(0)


def image(value: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (value, value, value))


class Editor:
    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def __call__(self, img: Image.Image, prompt: str) -> Image.Image:
        self.calls.append((img.getpixel((0, 0))[0], prompt))
        return image(len(self.calls) * 10)


def test_capped_score_follows_upstream_caps():
    # thinker.py:763-818 (`_apply_score_caps_and_finalize`)
    assert capped_score({"meets_instruction": "yes", "raw_score": 9.5})["score"] == 9.5
    assert capped_score({"meets_instruction": "partial", "raw_score": 0.8})["score"] == 5.0  # 0..1 scaled to 0..10
    assert capped_score({"meets_instruction": "yes", "raw_score": 9.5, "major_conflicts": 1})["score"] == 8.0
    assert capped_score({"meets_instruction": "yes", "raw_score": 9.5, "omissions": 2})["score"] == 7.0
    assert capped_score({"meets_instruction": "no", "raw_score": 9})["score"] == 2.0
    assert capped_score({"meets_instruction": "YES ", "raw_score": 9.5, "minor_conflicts": 3})["score"] == 9.5


def test_verdicts_and_language():
    # thinker.py:17-28 (validate_string) and 1127-1136 (format_text)
    assert read_verdict("<#Think> fine <#Success>") == (True, None)
    assert read_verdict("<#Think> no hat <#Reflection> add a hat") == (False, " add a hat")
    assert read_verdict("<#Think> broken <#Failed>") == (False, None)
    assert read_verdict("<#Think> x <#Success> <#Failed>") == (False, None)
    assert read_verdict("prefix <#Think> x <#Success>") == (False, None)
    assert language("把背景换成蓝色") == "中文" and language("make it 蓝") == "英文"  # thinker.py:31-54


def test_best_round_ties():
    # v1p2.py:1329-1355: highest min(score1) * min(score2); ties: a success wins, else the later round
    j = lambda verdict, a, b: Judgement(verdict, {"score": a}, {"score": b})  # noqa: E731
    assert best_round([j("x", [5, 6], [4, 9]), j("x", [9, 2], [9, 9])]) == 0
    assert best_round([j("<#Success>", [4], [5]), j("x", [5], [4])]) == 0
    assert best_round([j("x", [4], [5]), j("x", [5], [4])]) == 1
    assert best_round([j("x", ["bad"], [5]), j("x", [], [4])]) == 1  # unparsable scores count 0


def test_reflection_reedits_the_result_then_stops_on_success():
    answers = ["rewritten: paint the wall",  # think
               "a red wall", CONSISTENT, "<#Think> wall not red <#Reflection> make the wall red",
               scores(3, 4), scores(5, 5),  # round 1
               "a red wall", CONSISTENT, "<#Think> done <#Success>", scores(8, 8), scores(7, 9)]  # round 2
    mllm, editor = Script(answers), Editor()
    out = reasoned_edit(editor, mllm, image(200), "paint the wall", think=True, reflect=3, retries=2)
    # round 2 edits round 1's output (value 10) with the reflection's instruction; success ends the loop
    assert editor.calls == [(200, "rewritten: paint the wall"), (10, " make the wall red")]
    assert out.best == 1 and out.image.getpixel((0, 0))[0] == 20
    assert [role for role, _ in out.texts] == ["think"] + ["describe", "consistency", "reflect", "score1", "score2"] * 2
    # the judge sees the input image and the rewritten instruction (v1p2.py:1079-1080, 1306)
    system, content = mllm.calls[1]
    assert content[0].getpixel((0, 0))[0] == 200 and "rewritten: paint the wall" in content[1]
    # the reflection prompt carries the capped consistency score and its reason
    assert "- Score: 9.0\n" in mllm.calls[3][1][2] and "- Reason: ok\n" in mllm.calls[3][1][2]


def test_unparsable_answers_retry_then_restart_from_the_input():
    answers = ["d", "not json", "still not", scores(1, 1), scores(2, 2),  # round 1: consistency fails twice
               "d", CONSISTENT, "garbage", "<#Think> bad <#Failed>", "oops", scores(1, 2), scores(3, 3)]
    editor = Editor()
    out = reasoned_edit(editor, Script(answers), image(200), "x", think=False, reflect=2, retries=2)
    assert out.judgements[0].verdict == FAILED_VERDICT  # upstream's failure result after the retries
    assert editor.calls == [(200, "x"), (200, "x")]  # no reflection instruction: restart from the input
    assert out.judgements[1].score1 == {"score": [1, 2], "reasoning": "r"}  # parsed at the second attempt
    assert out.best == 1 and len(out.images) == 2


def test_scores_fall_back_after_the_retries():
    answers = ["d", CONSISTENT, "<#Think> ok <#Success>", "no", "no", scores(2, 2)]
    out = reasoned_edit(Editor(), Script(answers), image(200), "x", think=False, reflect=2, retries=2)
    assert out.judgements[0].score1 == {"score": [0, 0], "reasoning": "evaluation failed"}
    assert len(out.images) == 1  # success ends the loop


def test_prompts_are_upstreams():
    system, user = PROMPTS["think"]
    text = user.substitute(instruction="make it red", language="英文")
    assert text.startswith("You are an 'editing task instruction rewriter'.")
    assert text.endswith("User input instruction:make it red\nYour returned instruction must be in 英文. Your "
                         "returned instruction must be in 英文. Your returned instruction must be in 英文.\n"
                         "The returned instruction is:")
    assert PROMPTS["score2"][1].substitute() .count('"score" : [...]') == 1


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("v12") / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_v12_think_and_reflect_print_the_texts(photo_path, tmp_path, monkeypatch):
    # The CLI's wiring is under test, not the texts: random weights rarely end a text early, so every one of the
    # nine generations would run to the published 128 tokens, each on judge images upscaled to >= 512^2 pixels.
    for name, value in (("MAX_NEW_TOKENS", 8), ("JUDGE_MIN_PIXELS", 56 * 56), ("JUDGE_MAX_PIXELS", 112 * 112)):
        monkeypatch.setattr(f"step1x_export.step1x_ref.mllm.generation.{name}", value)
    args = ["edit", "--model", "tiny-v1.2", "--image", str(photo_path), "--out", str(tmp_path / "a.png"),
            "--prompt", 'Write "HI"', "--steps", "1", "--size-level", "32", "--quiet"]
    base = CliRunner().invoke(main, args)
    assert base.exit_code == 0, base.output
    assert "[think]" not in base.output and (tmp_path / "a.png").is_file()
    run = CliRunner().invoke(main, [*args, "--think", "--reflect", "2", "--judge-retries", "1"])
    out = run.output
    assert run.exit_code == 0, out
    roles = [line.split("]")[0] + "]" for line in out.splitlines() if line.startswith("[")]
    assert roles == ["[think]"] + ["[describe]", "[consistency]", "[score1]", "[score2]"] * 2
    assert "round 1: score 0" in out and "round 2: score 0 (chosen)" in out


def test_cli_think_needs_v12(photo_path, tmp_path):
    result = CliRunner().invoke(main, ["edit", "--model", "tiny", "--image", str(photo_path), "--prompt", "x",
                                       "--out", str(tmp_path / "a.png"), "--think"])
    assert result.exit_code != 0 and "v1.2" in result.output


def test_generation_is_seeded():
    from step1x_export.step1x_ref.mllm.generation import TextGenerator
    from step1x_export.step1x_ref.pipeline import Step1XEditPipeline

    embedder = Step1XEditPipeline.random("tiny-v1.2").embedder
    ask = [image(100), "Describe it."]
    texts = [TextGenerator.for_embedder(embedder, seed)("You judge.", ask) for seed in (0, 0, 1)]
    assert texts[0] == texts[1] != texts[2]
