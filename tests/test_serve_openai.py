"""OpenAI's images API, API keys and live progress, driven by the official `openai` client as a third party
would: a real server on a loopback port (uvicorn in a thread of this process, so the tests can compare with
its own runtime's serial edits), the trained toy model, keys required."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serving import in_process_server, input_png, metric, pixels, wait_for

from step1x_export.serve import RuntimeSpec, ServeLimits
from step1x_export.serve.auth import KeyPolicy

pytestmark = pytest.mark.xdist_group("serve")
KEYS = ("key-alpha-0123456789", "key-beta-9876543210")
PNG = input_png()
PROMPT = "make it black and white"  # one of the toy's tasks
FAST = {"steps": 4}


@pytest.fixture(scope="module")
def toy():
    # refuse_late off: before anything is measured the forecast takes 1 s a step, and a long edit must run
    limits = ServeLimits(default_size_level=64, timeout_s=60, warmup=False, max_steps=1000, refuse_late=False)
    with in_process_server(RuntimeSpec("toy"), limits, KeyPolicy(KEYS, max_concurrent=1)) as (url, service):
        yield url, service


def client(url: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def serial(service, seed: int, image: bytes | None = PNG, **kw) -> np.ndarray:
    """The same edit on the served runtime, called directly (one at a time)."""
    picture = Image.open(io.BytesIO(image)).convert("RGB") if image is not None else None
    out = service.runtime.edit(picture, PROMPT, seed=seed, steps=FAST["steps"], **kw)
    return np.asarray(out)


def decoded(b64: str) -> np.ndarray:
    return pixels(base64.b64decode(b64))


def test_models_lists_the_served_model(toy):
    url, _ = toy
    assert [m.id for m in client(url).models.list()] == ["toy"]


def test_edit_through_the_openai_client_is_the_runtimes_edit(toy):
    url, service = toy
    answered = metric(url, "step1x_requests_total", 'status="200"')
    r = client(url).images.edit(image=("in.png", PNG, "image/png"), prompt=PROMPT, n=2, size="64x48",
                                response_format="b64_json", extra_body={"seed": 3, **FAST})
    assert len(r.data) == 2 and r.size == "64x48"
    assert [e["seed"] for e in r.model_dump()["step1x"]] == [3, 4]  # n images: seed, seed + 1
    for item, seed in zip(r.data, (3, 4), strict=True):
        assert np.array_equal(decoded(item.b64_json), serial(service, seed, size_level=64))
    assert metric(url, "step1x_requests_total", 'status="200"') == answered + 1  # /metrics counts this API too


def test_generate_is_text_to_image_at_the_asked_size(toy):
    url, service = toy
    r = client(url).images.generate(prompt=PROMPT, size="64x32", extra_body={"seed": 5, **FAST})
    got = decoded(r.data[0].b64_json)
    assert got.shape == (32, 64, 3)
    assert {"mllm", "denoise", "vae_decode", "total"} <= r.model_dump()["step1x"][0]["timings"].keys()
    # the toy learned only edits: its answer says the picture is none
    assert any("never pictures from text" in w for w in r.model_dump()["step1x"][0]["warnings"])
    assert np.array_equal(got, serial(service, 5, None, width=64, height=32))


@pytest.mark.parametrize(("call", "error", "content"), [
    (lambda c: c.images.edit(image=("in.png", PNG, "image/png"), prompt=PROMPT, extra_body={"steps": 0}),
     openai.BadRequestError, "steps must be in [1, 1000]"),
    (lambda c: c.images.edit(image=("in.png", PNG, "image/png"), prompt=PROMPT, response_format="url"),
     openai.BadRequestError, "response_format must be b64_json"),
    (lambda c: c.images.edit(image=("in.png", PNG, "image/png"), prompt=PROMPT, size="1024x1024"),
     openai.BadRequestError, "keeps its input's size (64x48)"),
    (lambda c: c.images.generate(prompt=PROMPT, model="dall-e-3"), openai.NotFoundError, "'dall-e-3' is not served"),
    (lambda c: c.images.edit(image=("in.png", PNG, "image/png"), prompt=PROMPT, extra_body={"think": True}),
     openai.BadRequestError, "think and reflect are v1.2 features"),
])
def test_errors_have_openais_shape(toy, call, error, content):
    url, _ = toy
    with pytest.raises(error) as caught:
        call(client(url))
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and content in body["message"], body


def test_a_wrong_or_missing_key_is_401_without_detail_and_never_logged(toy, caplog):
    url, _ = toy
    caplog.set_level(logging.DEBUG)
    with pytest.raises(openai.AuthenticationError) as caught:
        client(url, "key-alpha-012345678X").models.list()  # one character off
    assert caught.value.status_code == 401 and caught.value.body["message"] == "unauthorized"
    missing = httpx.get(f"{url}/v1/models")
    assert missing.status_code == 401 and missing.json() == {"error": caught.value.body}
    assert httpx.post(f"{url}/v1/edits", files={"image": ("in.png", PNG)}).status_code == 401
    assert client(url, KEYS[1]).models.list().data[0].id == "toy"  # the second key is as good
    assert httpx.get(f"{url}/healthz").status_code == 200  # open by default
    assert not any(k in caplog.text or k[:12] in caplog.text for k in KEYS)


def test_a_keys_second_concurrent_request_is_429_with_retry_after(toy):
    url, _ = toy
    result = {}
    long = threading.Thread(target=lambda: result.update(r=client(url).images.edit(
        image=("in.png", PNG, "image/png"), prompt=PROMPT, extra_body={"steps": 60, "seed": 1})))
    long.start()
    try:
        wait_for(lambda: httpx.get(f"{url}/metrics").text.count("step1x_running_edits 1.0") == 1, 60, "edit running")
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).models.list()
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert client(url, KEYS[1]).models.list().data[0].id == "toy"  # another key is not held up
    finally:
        long.join(120)
    assert len(result["r"].data) == 1
    assert client(url).models.list().data[0].id == "toy"  # the slot is free again


def test_openai_stream_sends_partial_images_then_the_edit(toy):
    url, service = toy
    stream = client(url).images.edit(image=("in.png", PNG, "image/png"), prompt=PROMPT, stream=True, partial_images=2,
                                     extra_body={"seed": 9, **FAST})
    events = [e.model_dump() for e in stream]
    assert [e["type"] for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    assert [e["step"] for e in events[:2]] == [1, 3] and all(e["total_steps"] == 4 for e in events[:2])
    assert all(e["eta_s"] > 0 for e in events[:2])
    for e in events[:2]:  # the preview: 1/8 of the 64x48 edit, through the toy's fitted map
        assert decoded(e["b64_json"]).shape == (6, 8, 3)
    assert np.array_equal(decoded(events[-1]["b64_json"]), serial(service, 9, size_level=64))


def test_edits_stream_reports_each_step_an_eta_and_previews(toy):
    url, service = toy
    fields = {"instruction": PROMPT, "seed": "9", "stream": "true", **{k: str(v) for k, v in FAST.items()}}
    events = []
    with httpx.stream("POST", f"{url}/v1/edits", headers={"Authorization": f"Bearer {KEYS[0]}"},
                      files={"image": ("in.png", PNG, "image/png")}, data=fields, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    progress = [d for k, d in events if k == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and all(p["total"] == 4 for p in progress)
    etas = [p["eta_s"] for p in progress]
    assert etas == sorted(etas, reverse=True) and etas[-1] >= 0
    assert [d["step"] for k, d in events if k == "preview"] == [1, 2, 3, 4]
    kind, result = events[-1]
    assert kind == "result" and result["seed"] == 9
    assert np.array_equal(decoded(result["image_png_base64"]), serial(service, 9, size_level=64))


def test_the_fitted_preview_map_reproduces_a_held_out_edit(toy):
    """The runtime hands the latents of each step to `latents`; the toy's stored map turns the last ones into
    the decoded picture's 8x8 block means within 0.05 RMS (0.020 on the edits it was fitted on) on a picture it
    was not fitted on; the picture's own mean colour (no map at all) is off by far more."""
    from skimage import data

    from step1x_export.serve.preview import Projection, block_mean
    from step1x_export.step1x_ref.sampling import unpack

    _, service = toy
    seen = []
    photo = Image.fromarray(data.colorwheel()).resize((160, 128))  # not among the fit's photos (0.029 here)
    out = service.runtime.edit(photo, "invert the colours", seed=0, steps=6, size_level=144,
                               latents=lambda tokens: seen.append(tokens.clone()))
    assert len(seen) == 6 and torch_equal(seen[-1], service.runtime.last_latent)
    w, h = out.size
    projection = Projection.for_model("toy")
    preview = projection.rgb(unpack(seen[-1].float(), h, w)[0].numpy()) / 255
    truth = block_mean(np.asarray(out, np.float32) / 255)
    rms = float(np.sqrt(np.mean((preview - truth) ** 2)))
    flat = float(np.sqrt(np.mean((truth - truth.mean(axis=(0, 1))) ** 2)))
    assert rms < 0.05 and flat > 3 * rms, (rms, flat)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_a_client_leaving_a_stream_stops_its_edit(toy):
    url, _ = toy
    fields = {"instruction": PROMPT, "steps": "1000", "stream": "true"}  # minutes of steps: far past this test
    stopped = metric(url, "step1x_dit_steps_total")
    with httpx.stream("POST", f"{url}/v1/edits", headers={"Authorization": f"Bearer {KEYS[0]}"},
                      files={"image": ("in.png", PNG, "image/png")}, data=fields, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("event: ")) == "event: progress"
    wait_for(lambda: metric(url, "step1x_running_edits") == 0, 60, "the edit stopping")
    assert metric(url, "step1x_dit_steps_total") - stopped < 900  # it stopped long before its 1000 steps
