"""A model that learned only a few instructions (the toy) says so: `models` lists them; an instruction outside
them is flagged before the edit on the command line (a warning naming the nearest tasks; `--strict` refuses),
by the API (`last_warnings`, a Python warning) and by the server (the JSON answer and a header). Models
without such a list (the published checkpoints, random tiny ones) are never flagged."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli import main
from step1x_export.instructions import KNOWN_TASKS_FILE, UnknownInstructionWarning, read_known_tasks
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.sources import known_tasks, small_pipeline
from step1x_export.toy.tasks import TASKS

UNKNOWN = "add a hat"
FAST_TOY = ["--steps", "1", "--size-level", "64", "--quiet"]


@pytest.fixture(scope="module")
def toy_rt():
    with Step1XEditRuntime.load("toy", device="cpu") as rt:
        yield rt


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 30)).save(path)
    return path


def test_the_toy_folder_carries_exactly_its_tasks():
    """The shipped file is what the toy was trained on (its tasks module), and every phrasing is known."""
    known = known_tasks("toy")
    assert known is not None and known.tasks == {t.name: t.instructions for t in TASKS}
    assert all(known.knows(p) for t in TASKS for p in t.instructions)
    assert not known.knows(UNKNOWN) and not known.knows("make the sky purple")
    assert known.nearest("make it black and white please")[0] == ("black_and_white", "make it black and white")
    assert known_tasks("tiny") is None  # random weights: no task at all, never flagged


def test_a_folder_without_the_file_is_never_flagged_and_a_bad_file_is_named(tmp_path):
    assert known_tasks(tmp_path) is None
    (tmp_path / KNOWN_TASKS_FILE).write_text('{"tasks": []}')
    with pytest.raises(ValueError, match=r"tasks.json: not a known-tasks file"):
        read_known_tasks(tmp_path)


def test_an_export_carries_the_models_tasks_and_an_export_over_it_without_any_drops_them(tmp_path, monkeypatch):
    """`export` writes the model's tasks.json into the export folder, where the runtime (`sources.known_tasks`
    of its engine dir) and the command line look; a model without one, exported over it (--force), leaves none.
    The graphs are stand-ins: the folder is what is tested, not ONNX."""
    from step1x_export import sources
    from step1x_export.cli.runtime_options import RuntimeArgs
    from step1x_export.export import export as export_module

    def stand_in_graph(module, args, spec, path, **kwargs):
        path.write_bytes(b"graph")
        return [path]

    monkeypatch.setattr(export_module, "export_graph", stand_in_graph)
    pipe = small_pipeline("toy")
    monkeypatch.setattr(sources, "small_pipeline", lambda name, **kwargs: pipe)  # built once for both exports
    out = tmp_path / "export"
    flags = ["--components", "vae_decoder", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, ["export", "--model", "toy", *flags])
    assert result.exit_code == 0, result.output
    assert f"the {len(known_tasks('toy').tasks)} tasks the toy model learned" in result.output
    assert known_tasks(out) == known_tasks("toy") and known_tasks(out) is not None
    assert RuntimeArgs(backend="onnxruntime", engine_dir=out).known_tasks() == known_tasks("toy")
    export_module.export_components(pipe, out, components=["vae_decoder"], force=True,
                                    progress=False)  # as for a model whose folder lists no tasks
    assert not (out / KNOWN_TASKS_FILE).exists() and known_tasks(out) is None


def test_models_lists_each_task_and_phrasing():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    for task in TASKS:
        assert task.name in result.output and all(f'"{p}"' in result.output for p in task.instructions)
    assert "size levels 64..160" in result.output and "tiny-v1.2" in result.output


def test_cli_strict_refuses_before_any_model_work(tmp_path, image, monkeypatch):
    monkeypatch.setattr(Step1XEditRuntime, "load", lambda *a, **k: pytest.fail("model work started"))
    result = CliRunner().invoke(main, ["edit", "--model", "toy", *FAST_TOY, "--image", str(image), "--prompt",
                                       UNKNOWN, "--strict", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 2, result.output
    assert "--strict: instruction 'add a hat' is not one the toy model learned" in result.output
    assert not (tmp_path / "o.png").exists()


def test_cli_warns_once_before_the_edit_naming_the_nearest_tasks(tmp_path, image):
    out = tmp_path / "o.png"
    result = CliRunner().invoke(main, ["edit", "--model", "toy", *FAST_TOY, "--image", str(image), "--prompt",
                                       "make it black and white please", "--out", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: instruction")]
    assert len(warnings) == 1 and "nearest: 'make it black and white' (black_and_white)" in warnings[0]
    assert result.output.index("warning: instruction") < result.output.index("wrote")


def test_cli_strict_lets_a_learned_instruction_through(tmp_path, image, monkeypatch):
    def load(*args, **kwargs):
        raise FileNotFoundError("the check passed; loading now")

    monkeypatch.setattr(Step1XEditRuntime, "load", load)
    result = CliRunner().invoke(main, ["edit", "--model", "toy", *FAST_TOY, "--image", str(image), "--prompt",
                                       "把图片变成黑白的", "--strict", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "Error: the check passed" in result.output and "warning" not in result.output


@pytest.mark.parametrize("size", [["--text-to-image"], ["--width", "64"]])
def test_cli_refuses_text_to_image_on_a_model_that_learned_only_edits(tmp_path, monkeypatch, size):
    monkeypatch.setattr(Step1XEditRuntime, "load", lambda *a, **k: pytest.fail("model work started"))
    result = CliRunner().invoke(main, ["edit", "--model", "toy", *FAST_TOY, *size, "--prompt",
                                       "make it black and white", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 2, result.output
    count = len(known_tasks("toy").tasks)
    assert (f"Error: --text-to-image: the toy model learned only {count} edits of an input image (`step1x-export "
            "models` lists them), never pictures from text") in result.output and "give --image FILE" in result.output
    assert not (tmp_path / "o.png").exists()


def test_api_text_to_image_on_the_toy_says_it_makes_no_picture_and_names_the_text_it_cuts(toy_rt):
    """The toy reads 64 tokens of text; text-to-image's default negative prompt is longer: the warning quotes it
    (it once said "instruction too long" of a short instruction)."""
    with pytest.warns(UserWarning) as caught:
        toy_rt.edit(None, "make it black and white", steps=1, width=64, height=64)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("the toy model learned only") and "never pictures from text" in m for m in messages)
    cut = [m for m in messages if "too long" in m]
    assert len(cut) == 1 and cut[0].startswith("text too long") and "'worst quality, wrong limbs" in cut[0], cut
    assert toy_rt.last_warnings == [m for m in messages if m.startswith("the toy model")]


def test_api_reports_it_with_the_result(toy_rt):
    img = Image.new("RGB", (64, 64))
    with pytest.warns(UnknownInstructionWarning, match="nearest"):
        toy_rt.edit(img, UNKNOWN, steps=1, size_level=64)
    assert len(toy_rt.last_warnings) == 1 and "'add a hat'" in toy_rt.last_warnings[0]
    toy_rt.edit(img, "mirror it left to right", steps=1, size_level=64)
    assert toy_rt.last_warnings == []


def test_the_tiny_model_is_never_flagged(tiny_pipe):
    rt = Step1XEditRuntime.from_pipeline(tiny_pipe)
    rt.edit(Image.new("RGB", (32, 32)), UNKNOWN, steps=1, size_level=32)
    assert rt.known_tasks is None and rt.last_warnings == []


def test_server_answers_it_in_json_and_a_header_and_holds_the_size_rule(toy_rt, monkeypatch):
    from starlette.testclient import TestClient

    from step1x_export.serve.app import create_app
    from step1x_export.serve.service import EditService
    from step1x_export.serve.spec import RuntimeSpec, ServeLimits

    monkeypatch.setattr(RuntimeSpec, "load", lambda self: toy_rt)
    monkeypatch.setattr(type(toy_rt), "close", lambda self: None)  # the module's runtime outlives the server
    service = EditService(RuntimeSpec("toy"), ServeLimits(warmup=False))
    service.load()
    form = {"steps": "1", "size_level": "64", "seed": "0"}
    image = {"image": ("in.png", _png(), "image/png")}
    with TestClient(create_app(service, load_on_startup=False)) as client:
        r = client.post("/v1/edits", data={**form, "instruction": UNKNOWN}, files=image,
                        headers={"accept": "application/json"})
        assert r.status_code == 200, r.text
        assert any("'add a hat' is not one the toy model learned" in w for w in r.json()["warnings"])
        r = client.post("/v1/edits", data={**form, "instruction": "把天空变成紫色"}, files=image)  # a Latin-1 header
        assert r.status_code == 200 and "not one the toy model learned" in r.headers["x-warnings"]
        assert "\\u628a" in r.headers["x-warnings"]  # the instruction, escaped
        r = client.post("/v1/edits", data={**form, "instruction": "左右镜像"}, files=image,
                        headers={"accept": "application/json"})
        assert r.status_code == 200 and r.json()["warnings"] == []
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["image_png_base64"]))).size == (64, 64)
        r = client.post("/v1/edits", data={**form, "instruction": "左右镜像", "size_level": "32"}, files=image)
        assert r.status_code == 400 and "size_level 32 is outside what the toy model learned" in r.json()["message"]
    service.close()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()
