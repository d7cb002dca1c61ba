"""The v1.2 toy (`toy-v1.2`): the toy's DiT fine-tuned through v1.2's prompt path. Its folder ships the DiT only
and reuses the toy's VAE and MLLM; it loads by name, really edits, its plan is recorded, and the fine-tune is
deterministic."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from step1x_export.hashing import file_sha256
from step1x_export.sources import PACKAGED, small_pipeline
from step1x_export.step1x_ref.imaging import pil_to_tensor
from step1x_export.step1x_ref.mllm.conditioner_v1p2 import Qwen25VLEmbedderV12
from step1x_export.step1x_ref.weights.loading import (
    DIT_FILES,
    QWEN_DIR,
    SHARED_FILE,
    VAE_FILE,
    CheckpointError,
    ModelFiles,
)
from step1x_export.threads import torch_threads
from step1x_export.toy.data import EVAL_SHAPES, shape_views
from step1x_export.toy.evaluate import to_pil
from step1x_export.toy.tasks import TASK_BY_NAME, psnr
from step1x_export.toy.v1p2_tune import FIGURES_FILE, TunePlan, tune

pytestmark = pytest.mark.xdist_group("toy")
FOLDER = PACKAGED["toy-v1.2"]
# Every task over returning the input, at every evaluated shape (figures.json), as the toy's test holds the toy:
# the fine-tune's smallest margin is black and white at 64x64, 5.7 dB.
MARGIN_DB = 5.0


def figures() -> dict:
    return json.loads((FOLDER / FIGURES_FILE).read_text())


def test_folder_ships_only_the_dit_and_reuses_the_toys_vae_and_mllm() -> None:
    files = ModelFiles.in_dir(FOLDER, "v1.2")
    assert files.dit == FOLDER / DIT_FILES["v1.2"][0]
    assert files.vae.resolve() == (PACKAGED["toy"] / VAE_FILE).resolve()
    assert files.qwen.resolve() == (PACKAGED["toy"] / QWEN_DIR).resolve()
    added = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert added <= 5.5e6, added  # the DiT + connector in fp32 and three small text files


def test_shared_pointer_is_followed_only_where_the_folder_lacks_the_files(tmp_path: Path) -> None:
    (tmp_path / DIT_FILES["v1.2"][0]).write_bytes(b"")
    (tmp_path / SHARED_FILE).write_text(json.dumps({"vae_and_mllm": "nowhere"}))
    with pytest.raises(CheckpointError, match=rf"{SHARED_FILE} names .*nowhere, which is not a folder"):
        ModelFiles.in_dir(tmp_path, "v1.2")
    (tmp_path / SHARED_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match=r"cannot read .*shared.json .*vae_and_mllm"):
        ModelFiles.in_dir(tmp_path, "v1.2")
    (tmp_path / VAE_FILE).write_bytes(b"")  # a folder with its own VAE is read as it is: no pointer
    with pytest.raises(CheckpointError, match=rf"missing Qwen2.5-VL directory {tmp_path / QWEN_DIR}"):
        ModelFiles.in_dir(tmp_path, "v1.2")


def test_loads_by_name_and_edits_better_than_identity() -> None:
    """By name, v1.2's rules (its embedder), and an edit of a held-out photo at the smallest evaluated shape
    beats returning the input by 3 dB on the task whose margin figures.json records as largest there."""
    with torch_threads(1):
        pipe = small_pipeline("toy-v1.2")
        assert pipe.config.name == "toy-v1.2" and pipe.config.version == "v1.2"
        assert isinstance(pipe.embedder, Qwen25VLEmbedderV12)
        w, h = EVAL_SHAPES[0]
        rows = [r for r in figures()["tasks"][f"{w}x{h}"] if r["task"] != "no_change"]
        task = TASK_BY_NAME[max(rows, key=lambda r: r["model_db"] - r["identity_db"])["task"]]
        view = shape_views(w, h)[1][:1]
        target = task.target(view)
        out = pipe.edit(to_pil(view[0]), task.english[0], seed=0, size_level=w)
    assert psnr(pil_to_tensor(out), target).item() > psnr(view, target).item() + 3, task.name


def test_figures_beat_identity_at_every_shape_and_record_the_plan() -> None:
    """What the fine-tune measured on the held-out images: every task beats returning the input at every shape
    the toy is evaluated at; the plan recorded is today's default and started from the shipped toy's DiT."""
    recorded = figures()
    assert set(recorded["tasks"]) == {f"{w}x{h}" for w, h in EVAL_SHAPES}
    for shape, rows in recorded["tasks"].items():
        margins = {r["task"]: r["model_db"] - r["identity_db"] for r in rows if r["task"] != "no_change"}
        assert all(m >= MARGIN_DB for m in margins.values()), (shape, margins)
    assert recorded["plan"] == json.loads(json.dumps(asdict(TunePlan())))
    toy_dit = PACKAGED["toy"] / DIT_FILES["v1.1"][0]
    assert recorded["started_from"]["dit_sha256"] == file_sha256(toy_dit), "the toy changed: re-run the fine-tune"


def test_fine_tune_is_deterministic() -> None:
    """Two seeded quick runs give bit-identical weights, which the run did move from the toy's."""
    plan = TunePlan.quick(0)
    a, b = (tune(plan, log=lambda _: None).model.state_dict() for _ in range(2))
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    toy = small_pipeline("toy").model.state_dict()
    assert not torch.equal(a["txt_in.weight"], toy["txt_in.weight"])


def test_runtime_loads_it_by_name_with_regione_and_it_still_edits() -> None:
    """`Step1XEditRuntime.load("toy-v1.2", cache="regione")`: the runtime's path (v1.2's per-branch calls under
    RegionE's step) on the trained weights, its edit of a held-out photo 3 dB nearer the target than the input."""
    from step1x_export.runtime import Step1XEditRuntime

    w, h = EVAL_SHAPES[0]
    view = shape_views(w, h)[1][:1]
    task = TASK_BY_NAME["invert"]
    with torch_threads(1), Step1XEditRuntime.load("toy-v1.2", cache="regione", device="cpu") as rt:
        assert rt.config.name == "toy-v1.2"
        out = rt.edit(to_pil(view[0]), task.english[0], seed=0, size_level=w)
        assert rt.cache_stats is not None and rt.cache_stats.reused > 0
    target = task.target(view)
    assert psnr(pil_to_tensor(out), target).item() > psnr(view, target).item() + 3
