"""The web page at `/` in a real browser, against a stand-in API (no model): every default and bound comes
from `/v1/model`, the form posts those, and nothing is drawn as a broken image before the first edit."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BASE = "http://page.test/"
# Not the real model's numbers (cfg 6, 28 steps): a page with its own defaults would show those instead.
PARAMS = {"max_steps": 40, "min_size_level": 24, "max_size_level": 96, "default_size_level": 48,
          "default_steps": 11, "default_cfg": 2.25, "min_cfg": 0.0, "max_cfg": 30.0, "max_pixels": 4096,
          "timeout_s": 60.0}
MODEL = {"model": {"source": "toy", "backend": "torch", "config": "toy"}, "state": "ready", "params": PARAMS,
         "limits": {}}


@contextmanager
def stand_in_page(edits: Callable) -> Iterator:
    """The page in headless Chromium, its /v1/model answered with MODEL and its /v1/edits by `edits`."""
    from playwright.sync_api import sync_playwright

    html = files("step1x_export.serve").joinpath("page.html").read_text(encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route(BASE, lambda route: route.fulfill(content_type="text/html", body=html))
            page.route(BASE + "v1/model", lambda route: route.fulfill(json=MODEL))
            page.route(BASE + "v1/edits", edits)
            page.goto(BASE)
            yield page
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_page_takes_defaults_and_bounds_from_the_model_and_shows_no_broken_image(tmp_path):
    posted: list[str] = []

    def edits(route):
        posted.append(route.request.post_data_buffer.decode("latin-1"))
        route.fulfill(status=503, json={"error": "busy", "message": "stand-in server"})

    with stand_in_page(edits) as page:
        page.wait_for_function("document.getElementById('steps').value !== ''")
        shown = page.evaluate("""() => Object.fromEntries(['steps', 'cfg', 'size_level'].map((id) => {
            const e = document.getElementById(id); return [id, [e.value, e.min, e.max]]; }))""")
        assert shown == {"steps": ["11", "1", "40"], "cfg": ["2.25", "0", "30"], "size_level": ["48", "24", "96"]}
        # Before any image: neither picture is rendered (a broken-image icon would be), placeholders are.
        for img in ("input", "result"):
            assert page.evaluate(f"getComputedStyle(document.getElementById('{img}')).display") == "none"
        assert page.locator(".empty").evaluate_all("els => els.map(e => getComputedStyle(e).display)") == \
            ["flex", "flex", "flex"]

        (tmp_path / "in.png").write_bytes(_png())
        page.set_input_files("#image", str(tmp_path / "in.png"))
        page.fill("#instruction", "swap red and blue")
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('error 503')")
        assert page.evaluate("getComputedStyle(document.getElementById('input')).display") == "block"
        assert page.evaluate("getComputedStyle(document.getElementById('result')).display") == "none"
    form = _fields(posted[0])
    assert form["steps"] == "11" and form["cfg"] == "2.25" and form["size_level"] == "48"
    assert "seed" not in form  # empty: the server draws one


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_page_shows_the_streamed_steps_eta_and_preview_then_the_result(tmp_path):
    """A stand-in server streams two steps with previews (4x4 PNGs) and a 32x32 result: the page shows the
    progress, the ETA and the last preview, then the result."""
    import base64
    import json

    preview, result = base64.b64encode(_png(4)).decode(), base64.b64encode(_png(32)).decode()
    events = [("progress", {"step": 1, "total": 2, "eta_s": 3.25, "elapsed_s": 0.1}),
              ("preview", {"step": 1, "total": 2, "index": 0, "preview_png_base64": preview}),
              ("progress", {"step": 2, "total": 2, "eta_s": 0.5, "elapsed_s": 0.2}),
              ("preview", {"step": 2, "total": 2, "index": 1, "preview_png_base64": preview}),
              ("result", {"seed": 4, "width": 32, "height": 32, "timings": {"denoise": 0.2}, "warnings": [],
                          "image_png_base64": result})]
    stream = "".join(f"event: {k}\ndata: {json.dumps(d)}\n\n" for k, d in events)
    posted: list[str] = []

    def edits(route):
        posted.append(route.request.post_data_buffer.decode("latin-1"))
        route.fulfill(status=200, content_type="text/event-stream", body=stream)

    with stand_in_page(edits) as page:
        (tmp_path / "in.png").write_bytes(_png())
        page.set_input_files("#image", str(tmp_path / "in.png"))
        page.fill("#instruction", "swap red and blue")
        seen = []  # the status line as the events arrive
        page.expose_function("record", lambda text: seen.append(text))
        # each status() replaces the line's text node: the added nodes keep every text it showed
        page.evaluate("new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach((n) => "
                      "window.record(n.textContent)))).observe(document.getElementById('status'), "
                      "{childList: true})")
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        assert page.evaluate("[document.getElementById('progress').value, document.getElementById('progress').max]") \
            == [2, 2]
        assert page.evaluate("document.getElementById('preview').naturalWidth") == 4
        assert page.evaluate("document.getElementById('result').naturalWidth") == 32
        assert "after step 2/2" in page.inner_text("#preview-caption")
        assert "2 steps" in page.inner_text("#status")
    assert "step 1/2 · about 3.2 s left" in seen or "step 1/2 · about 3.3 s left" in seen, seen
    assert _fields(posted[0])["stream"] == "true"


def _png(side: int = 32) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def _fields(multipart: str) -> dict[str, str]:
    """The text fields of a multipart/form-data body."""
    out = {}
    for part in multipart.split("\r\n--"):
        head, _, body = part.partition("\r\n\r\n")
        if 'name="' in head and "filename=" not in head:
            out[head.split('name="')[1].split('"')[0]] = body.rstrip("\r\n-")
    return out

