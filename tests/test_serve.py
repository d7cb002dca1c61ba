"""The HTTP edit service as a client sees it: a real `step1x-export serve` process on a loopback port.

Two servers: a roomy one (the API, the page in a real browser, the load test) and a tight one (one queue
slot, small upload limits) for back-pressure, deadlines, disconnects and shutdown. Waits are generous
upper bounds that return as soon as the condition holds, so a loaded machine slows the tests, not fails them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import EDIT, assert_same_edit, input_png, metric, open_raw_edit, pixels, serial_reference, server, wait_for

from step1x_export.serve.load import run_load

pytestmark = pytest.mark.xdist_group("serve")  # two server processes, shared by the tests of this module
PNG = input_png()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    # otherwise the defaults: batches of 4 (fixed, so batching is tested whether or not it pays on this CPU),
    # admission by deadline
    with server(["--size-level", "32", "--timeout", "60", "--fixed-batch"],
                tmp_path_factory.mktemp("roomy") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    args = ["--size-level", "32", "--max-batch", "1", "--max-queue", "1", "--no-refuse-late", "--timeout", "60",
            "--max-steps", "1000", "--max-upload-mb", "0.05", "--max-megapixels", "0.01"]
    with server(args, tmp_path_factory.mktemp("tight") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """Serial in-process edits of seeds 0..63 (the load test's) and 7 (the single-request tests')."""
    return serial_reference(list(range(64)), PNG)


def post(url: str, fields: dict[str, str] = EDIT, png: bytes | None = PNG, **kwargs) -> httpx.Response:
    """A multipart edit request (multipart even without an image: its text fields as form parts)."""
    files = {"image": ("in.png", png, "image/png")} if png is not None else {k: (None, v) for k, v in fields.items()}
    return httpx.post(f"{url}/v1/edits", data=fields if png is not None else None, files=files, timeout=120,
                      **kwargs)


def test_edit_answers_a_png_of_the_input_size_equal_to_a_serial_run(roomy, reference):
    assert roomy.ready_states[0] == 503 and roomy.ready_states[-1] == 200  # ready only after load + warm-up
    before = metric(roomy.url, "step1x_requests_total", 'status="200"')
    steps_before = metric(roomy.url, "step1x_dit_steps_total")
    r = post(roomy.url, {**EDIT, "seed": "7"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert pixels(r.content).shape == (48, 64, 3)
    assert np.array_equal(pixels(r.content), reference[7])
    assert r.headers["x-seed"] == "7"
    assert json.loads(r.headers["x-model"])["config"] == "tiny"
    assert {"mllm", "denoise", "vae_decode", "queue", "total"} <= json.loads(r.headers["x-timings"]).keys()
    assert "denoise;dur=" in r.headers["server-timing"]
    assert metric(roomy.url, "step1x_requests_total", 'status="200"') == before + 1
    assert metric(roomy.url, "step1x_dit_steps_total") == steps_before + 2


def test_json_variant_carries_the_same_png_and_a_drawn_seed(roomy, reference):
    r = post(roomy.url, {**EDIT, "seed": "7"}, headers={"Accept": "application/json"})
    body = r.json()
    assert r.status_code == 200 and body["seed"] == 7 and body["width"] == 64 and body["height"] == 48
    assert np.array_equal(pixels(base64.b64decode(body["image_png_base64"])), reference[7])
    drawn = post(roomy.url, EDIT, headers={"Accept": "application/json"}).json()  # no seed: the server draws one
    assert isinstance(drawn["seed"], int) and drawn["params"]["steps"] == 2


@pytest.mark.parametrize(("fields", "png", "content"), [
    (EDIT, b"this is not an image", "not an image"),
    ({**EDIT, "steps": "abc"}, PNG, "steps must be an integer in [1, 100], got 'abc'"),
    ({**EDIT, "steps": "0"}, PNG, "steps must be in [1, 100], got 0"),
    ({**EDIT, "cfg": "nan"}, PNG, "cfg must be a finite number"),
    ({**EDIT, "size_level": "100000"}, PNG, "size_level must be in [16, 256]"),
    ({**EDIT, "seed": "-1"}, PNG, "seed must be in [0, "),
    ({**EDIT, "strength": "0.5"}, PNG, "unknown form field(s) ['strength']"),
    ({"steps": "2"}, PNG, "lacks the field 'instruction'"),
    ({**EDIT, "timeout_s": "1000"}, PNG, "timeout_s must be in [0.01, 60]"),
    (EDIT, None, "lacks an image file"),
    (EDIT, input_png(8, 8), "at least 16 px"),
])
def test_bad_requests_get_a_400_json_naming_the_problem(roomy, fields, png, content):
    r = post(roomy.url, fields, png)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "bad_request" and content in r.json()["message"], r.json()
    assert "Traceback" not in r.text


def test_not_multipart_is_a_400_and_unknown_paths_are_json(roomy):
    r = httpx.post(f"{roomy.url}/v1/edits", json={"instruction": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["message"]
    r = httpx.get(f"{roomy.url}/v2/nothing")
    assert r.status_code == 404 and r.json()["error"] == "http"


def test_health_model_and_page(roomy):
    assert httpx.get(f"{roomy.url}/healthz").json()["status"] == "alive"
    info = httpx.get(f"{roomy.url}/v1/model").json()
    assert info["params"]["max_size_level"] == 256 and info["params"]["default_size_level"] == 32
    assert info["model"]["backend"] == "torch"
    page = httpx.get(f"{roomy.url}/")
    assert page.status_code == 200 and "<form" in page.text and page.headers["content-type"].startswith("text/html")


def test_load_64_requests_from_8_clients_lose_and_mix_up_nothing(roomy, reference):
    before = metric(roomy.url, "step1x_requests_total", 'status="200"')
    report = run_load(roomy.url, PNG, list(range(64)), clients=8, fields=EDIT, timeout_s=60)
    assert not report.errors and len(report.replies) == 64
    assert all(r.status == 200 for r in report.replies), [(r.status, r.body[:200]) for r in report.replies]
    for reply in report.replies:
        assert reply.headers["x-seed"] == str(reply.seed)
        assert_same_edit(pixels(reply.body), reference[reply.seed], reply.seed)
    assert metric(roomy.url, "step1x_requests_total", 'status="200"') == before + 64
    print("single process, 8 clients:", report.summary())


def test_a_burst_of_16_clients_is_served_and_batched(roomy, reference):
    """64 requests from 16 clients (each sends its next one when answered): the default server, whose
    deadline rule admits what it predicts to finish in time, serves them all; edits shared DiT steps."""
    batched_before = metric(roomy.url, "step1x_edit_batch_size_sum")
    report = run_load(roomy.url, PNG, list(range(64)), clients=16, fields=EDIT, timeout_s=60)
    refused = [r for r in report.replies if r.status == 503]
    assert not report.errors and len(report.ok) == 64, (len(refused), [r.body[:200] for r in refused[:3]])
    for reply in report.ok:
        assert_same_edit(pixels(reply.body), reference[reply.seed], reply.seed)
    mean_batch = (metric(roomy.url, "step1x_edit_batch_size_sum") - batched_before) / 64
    assert mean_batch > 1.5, mean_batch  # 16 clients keep the batch of 4 mostly full
    print("single process, 16 clients:", report.summary(), f"mean batch {mean_batch:.2f}")


def test_an_edit_that_cannot_finish_by_its_deadline_is_refused_at_once(roomy):
    """Predicted completion past the request's own deadline: 503 past_deadline with the predicted wait."""
    r = post(roomy.url, {**EDIT, "steps": "100", "timeout_s": "0.05"})
    assert r.status_code == 503 and r.json()["error"] == "past_deadline", r.text
    assert int(r.headers["retry-after"]) >= 1 and r.elapsed.total_seconds() < 5


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_the_page_makes_an_edit_in_a_real_browser(roomy, tmp_path):
    from playwright.sync_api import sync_playwright
    from skimage import data

    Image.fromarray(data.astronaut()).resize((96, 64)).save(tmp_path / "astronaut.png")  # a real photo
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(roomy.url + "/")
            page.wait_for_function("document.getElementById('size_level').value === '32'")
            page.set_input_files("#image", str(tmp_path / "astronaut.png"))
            page.fill("#instruction", "add a red hat")
            page.fill("#steps", "4")
            page.fill("#seed", "11")
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
            size = page.evaluate("[document.getElementById('result').naturalWidth, "
                                 "document.getElementById('result').naturalHeight]")
            assert size == [96, 64]
            assert "seed 11" in page.inner_text("#result-caption")
            assert "denoise" in page.inner_text("#timings")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("STEP1X_SERVE_SCREENSHOT"):  # to look at the page: a copy where asked
        shutil.copy(tmp_path / "page.png", os.environ["STEP1X_SERVE_SCREENSHOT"])


# -- the tight server: back-pressure, deadlines, disconnects, limits, shutdown ---------------------------------
def running(url: str) -> float:
    return metric(url, "step1x_running_edits")


def test_full_queue_is_503_with_retry_after_and_leaving_clients_free_their_slots(tight):
    gone_before = metric(tight.url, "step1x_errors_total", 'error="client_gone"')
    long_edit = open_raw_edit(tight.url, {**EDIT, "steps": "1000"}, PNG)  # >= 25 s: far past what this test needs
    wait_for(lambda: running(tight.url) == 1, 60, "the long edit running")
    queued = open_raw_edit(tight.url, EDIT, PNG)
    wait_for(lambda: metric(tight.url, "step1x_queue_depth") == 1, 60, "one edit queued")
    r = post(tight.url)
    assert r.status_code == 503 and r.json()["error"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    queued.close()  # leaves while waiting: its slot is free at once
    wait_for(lambda: metric(tight.url, "step1x_queue_depth") == 0, 60, "the queued edit leaving")
    long_edit.close()  # leaves while running: the edit stops at its next denoising step
    wait_for(lambda: running(tight.url) == 0, 60, "the running edit stopping")
    assert metric(tight.url, "step1x_errors_total", 'error="client_gone"') == gone_before + 2
    assert post(tight.url).status_code == 200  # the server is free again


def test_an_edit_past_its_deadline_is_a_504_and_stops(tight):
    r = post(tight.url, {**EDIT, "steps": "1000", "timeout_s": "1"})  # 1000 steps take ~25 s unloaded
    assert r.status_code == 504 and r.json()["error"] == "timeout"
    assert r.elapsed.total_seconds() < 20  # 1 s, plus the step in flight (slow on a busy machine)
    wait_for(lambda: running(tight.url) == 0, 60, "the timed-out edit stopping")


def test_too_large_uploads_are_413(tight):
    r = post(tight.url, png=PNG + b"\0" * 60_000)  # body over 0.05 MB
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = post(tight.url, png=input_png(128, 128))  # 16,384 px > 0.01 MP, a small file
    assert r.status_code == 413 and r.json()["error"] == "image_too_large"


def test_shutdown_finishes_the_running_edit(tight):
    """SIGTERM while an edit runs: that edit is answered in full, then the process exits cleanly."""
    result: dict[str, httpx.Response] = {}
    client = threading.Thread(target=lambda: result.update(r=post(tight.url, {**EDIT, "steps": "100", "seed": "5"})))
    client.start()
    wait_for(lambda: running(tight.url) == 1, 60, "the edit running")
    tight.proc.send_signal(signal.SIGTERM)
    client.join(120)
    assert result["r"].status_code == 200 and pixels(result["r"].content).shape == (48, 64, 3)
    assert tight.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{tight.url}/healthz", timeout=2)


def test_cli_serves_the_tiny_model_by_default_and_refuses_missing_paths(monkeypatch):
    from click.testing import CliRunner

    import step1x_export.serve.server as server_module
    from step1x_export.cli import main

    seen = {}
    monkeypatch.setattr(server_module, "run_server", lambda spec, limits, **kw: seen.update(spec=spec, kw=kw))
    result = CliRunner().invoke(main, ["serve", "--port", "8123", "--max-queue", "3"])
    assert result.exit_code == 0, result.output
    keys = seen["kw"].pop("keys")
    assert seen["spec"].source == "tiny" and seen["kw"] == {"host": "127.0.0.1", "port": 8123, "log_level": "info"}
    assert not keys.enabled  # no keys given: open
    result = CliRunner().invoke(main, ["serve", "--model-dir", "/no/such/folder"])
    assert result.exit_code == 1 and "--model-dir /no/such/folder does not exist" in result.output
    assert "Traceback" not in result.output
    assert CliRunner().invoke(main, ["serve", "--help"]).exit_code == 0
