"""v1.2's thinking and reflection over HTTP (both APIs) on the random tiny-v1.2 model: the answer carries the
rewritten instruction, each round's image and the judge's texts, equal to the runtime's own reasoned edit;
admission counts every edit a reflection may run."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serving import in_process_server, input_png, pixels

from step1x_export.serve import RuntimeSpec, ServeLimits

pytestmark = pytest.mark.xdist_group("serve")
PNG = input_png(56, 40)
ASK = {"seed": 0, "steps": 1, "size_level": 32}
JUDGE = {"judge_retries": 1}


@pytest.fixture(scope="module")
def v12():
    # The wiring is under test, not the texts: random weights rarely stop early, so every generation would run
    # to the published 128 tokens on judge images upscaled to >= 512^2 pixels (as tests/test_reasoning.py).
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("MAX_NEW_TOKENS", 8), ("JUDGE_MIN_PIXELS", 56 * 56), ("JUDGE_MAX_PIXELS", 112 * 112)):
            mp.setattr(f"step1x_export.step1x_ref.mllm.generation.{name}", value)
        limits = ServeLimits(default_size_level=32, timeout_s=60, warmup=False)
        with in_process_server(RuntimeSpec("tiny-v1.2"), limits) as served:
            yield served


def test_admission_counts_every_edit_of_a_reflection(v12):
    """Before any edit is measured the forecast takes 1 s a step: 2 steps fit a 5 s deadline, ten rounds of
    them (20 s) do not."""
    url, _ = v12
    fields = {"instruction": "make it blue", "steps": "2", "size_level": "32", "timeout_s": "5"}
    files = {"image": ("in.png", PNG, "image/png")}
    r = httpx.post(f"{url}/v1/edits", files=files, data={**fields, "reflect": "10"}, timeout=60)
    assert r.status_code == 503 and r.json()["error"] == "past_deadline", r.text
    assert "about 20.0 s" in r.json()["message"]
    streamed = httpx.post(f"{url}/v1/edits", files=files, data={**fields, "reflect": "10", "stream": "true"},
                          timeout=60)
    assert streamed.status_code == 503 and streamed.json()["error"] == "past_deadline"  # refused before streaming
    assert int(streamed.headers["retry-after"]) >= 1
    assert httpx.post(f"{url}/v1/edits", files=files, data=fields, timeout=60).status_code == 200


def test_think_and_reflect_through_the_openai_client(v12):
    url, service = v12
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    r = c.images.edit(image=("in.png", PNG, "image/png"), prompt="make it blue",
                      extra_body={**ASK, **JUDGE, "think": True, "reflect": 2})
    reasoning = r.model_dump()["step1x"][0]["reasoning"]
    assert r.data[0].revised_prompt == reasoning["instruction"]
    expected = service.runtime.edit_reasoned(Image.open(io.BytesIO(PNG)).convert("RGB"), "make it blue", think=True,
                                             reflect=2, judge_retries=1, **ASK)
    assert reasoning["instruction"] == expected.instruction
    assert [(t["role"], t["text"]) for t in reasoning["texts"]] == expected.texts
    assert reasoning["best"] == expected.best and len(reasoning["rounds"]) == len(expected.images)
    for got, image, judgement in zip(reasoning["rounds"], expected.images, expected.judgements, strict=True):
        assert np.array_equal(pixels(base64.b64decode(got["image_png_base64"])), np.asarray(image))
        assert got["verdict"] == judgement.verdict and got["rank"] == judgement.rank
    assert np.array_equal(pixels(base64.b64decode(r.data[0].b64_json)), np.asarray(expected.image))


def test_think_on_v1_edits_answers_the_rewritten_instruction(v12):
    url, _ = v12
    fields = {"instruction": "make it blue", "think": "true", **{k: str(v) for k, v in {**ASK, **JUDGE}.items()}}
    r = httpx.post(f"{url}/v1/edits", files={"image": ("in.png", PNG, "image/png")}, data=fields, timeout=120,
                   headers={"Accept": "application/json"})
    body = r.json()
    assert r.status_code == 200, body
    assert [t["role"] for t in body["reasoning"]["texts"]] == ["think"]
    assert body["reasoning"]["instruction"] == body["reasoning"]["texts"][0]["text"].strip()
    assert len(body["reasoning"]["rounds"]) == 1
    png = httpx.post(f"{url}/v1/edits", files={"image": ("in.png", PNG, "image/png")}, data=fields, timeout=120)
    assert png.headers["content-type"] == "image/png" and "x-instruction" in png.headers


def test_a_streamed_reflection_counts_the_steps_of_every_round(v12):
    url, _ = v12
    fields = {"instruction": "make it blue", "reflect": "2", "stream": "true", "steps": "2", "seed": "0",
              "size_level": "32", **{k: str(v) for k, v in JUDGE.items()}}
    r = httpx.post(f"{url}/v1/edits", files={"image": ("in.png", PNG, "image/png")}, data=fields, timeout=120)
    events = [block.split("\n") for block in r.text.strip().split("\n\n")]
    progress = [json.loads(lines[1][6:]) for lines in events if lines[0] == "event: progress"]
    kind, result = events[-1][0], json.loads(events[-1][1][6:])
    rounds = len(result["reasoning"]["rounds"])
    assert kind == "event: result" and rounds in (1, 2)
    assert [p["step"] for p in progress] == list(range(1, 2 * rounds + 1))  # round 2 goes on from round 1's steps
    assert all(p["total"] == 4 for p in progress)  # 2 rounds of 2 steps at most
