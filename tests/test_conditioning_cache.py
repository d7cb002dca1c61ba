"""The conditioning cache: a pipeline loaded from a model folder reads an edit's MLLM conditioning from disk
when it has it, bit for bit what the MLLM computed, without loading the MLLM (or importing transformers);
anything the conditioning depends on is in the key; a broken entry is recomputed; `off` writes nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_export.sources import PACKAGED, small_pipeline
from step1x_export.step1x_ref.mllm.conditioning_cache import CACHE_ENV, ConditioningCache

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["swap red and blue", ""]


def photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "conditioning"


def edit(pipe, image: Image.Image) -> np.ndarray:
    return np.asarray(pipe.edit(image, TEXTS[0], seed=0, steps=2, size_level=64))


def test_a_second_load_reads_the_entry_without_loading_the_mllm(cache_dir: Path, tmp_path: Path) -> None:
    image = photo()
    first = small_pipeline("toy")
    computed = first.encode(TEXTS, image)
    assert not first.conditioning_from_cache and len(list(cache_dir.iterdir())) == 1
    torch.save(computed, tmp_path / "computed.pt")
    image.save(tmp_path / "in.png")
    # A fresh process, as a user's next run: the conditioning comes from disk and transformers is never imported.
    child = f"""
import sys, torch
from PIL import Image
from step1x_export.sources import small_pipeline
pipe = small_pipeline("toy")
got = pipe.encode({TEXTS!r}, Image.open({str(tmp_path / "in.png")!r}))
want = torch.load({str(tmp_path / "computed.pt")!r})
assert pipe.conditioning_from_cache and not isinstance(pipe._embedder, torch.nn.Module)
assert all(torch.equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want, strict=True)) and len(got) == 2
print("transformers" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), CACHE_ENV: str(cache_dir.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False"]


def test_an_edit_from_the_cache_equals_the_edit_computed(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = photo(1)
    monkeypatch.setenv(CACHE_ENV, "off")
    computed = edit(small_pipeline("toy"), image)
    monkeypatch.setenv(CACHE_ENV, str(cache_dir.parent))
    edit(small_pipeline("toy"), image)  # stores
    pipe = small_pipeline("toy")
    assert np.array_equal(edit(pipe, image), computed) and pipe.conditioning_from_cache


def test_the_key_covers_texts_image_and_every_mllm_file(cache_dir: Path, tmp_path: Path) -> None:
    pipe = small_pipeline("toy")
    cache = pipe.conditioning_cache
    paths = {cache.path(TEXTS, photo(0)), cache.path(["make it black and white", ""], photo(0)),
             cache.path(TEXTS, photo(2)), cache.path(TEXTS, photo(0).convert("RGBA"))}
    assert len(paths) == 4
    # The same weights in another folder are the same MLLM; one changed byte in any of its files is another.
    folder = tmp_path / "toy"
    shutil.copytree(PACKAGED["toy"], folder)
    qwen = folder / "Qwen2.5-VL-7B-Instruct"
    params, dtype, device = pipe.config.embedder, torch.float32, torch.device("cpu")
    assert ConditioningCache.for_mllm([qwen], params, dtype, device).identity == cache.identity
    template = qwen / "chat_template.jinja"
    template.write_text(template.read_text() + " ")
    assert ConditioningCache.for_mllm([qwen], params, dtype, device).identity != cache.identity
    assert ConditioningCache.for_mllm([PACKAGED["toy"] / qwen.name], params, torch.bfloat16, device).identity \
        != cache.identity


def test_a_broken_entry_is_computed_again_and_replaced(cache_dir: Path) -> None:
    image = photo(3)
    pipe = small_pipeline("toy")
    want = pipe.encode(TEXTS, image)
    entry = pipe.conditioning_cache.path(TEXTS, image)
    entry.write_bytes(b"not a safetensors file")
    again = small_pipeline("toy")
    got = again.encode(TEXTS, image)
    assert not again.conditioning_from_cache
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert pipe.conditioning_cache.load(TEXTS, image) is not None  # rewritten whole
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no temporary file left


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pipe = small_pipeline("toy")
    pipe.encode(TEXTS, photo())
    assert pipe.conditioning_cache is None and not pipe.conditioning_from_cache
    assert not any(tmp_path.iterdir())


def test_the_toy_ships_its_demo_conditioning_as_its_mllm_computes_it(cache_dir: Path) -> None:
    from step1x_export.specs import profile_for
    from step1x_export.toy.demo import demo_conditioning

    pipe = small_pipeline("toy")
    shipped = demo_conditioning(pipe, profile_for(pipe.config).max_level)
    assert pipe.conditioning_entry is not None and pipe.conditioning_entry.parent == pipe.conditioning_cache.shipped
    for texts, image, (emb, mask) in shipped:
        live_emb, live_mask = pipe.embedder(texts, image)
        assert torch.equal(mask, live_mask)
        # Another CPU may sum the MLLM's dot products (<= 128 terms in this tiny Qwen) in another order: each
        # op then differs by up to ~128 float32 ulps of its largest term; 1e-4 leaves room for a few layers.
        assert ((emb - live_emb).norm() / live_emb.norm()).item() <= 1e-4
    assert not any(cache_dir.parent.rglob("*.safetensors"))  # read from the model folder, nothing written


def test_shipped_entries_outlive_library_versions_not_the_mllm(cache_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from step1x_export.step1x_ref.mllm import conditioning_cache

    folder = tmp_path / "toy"
    shutil.copytree(PACKAGED["toy"], folder, ignore=shutil.ignore_patterns("conditioning"))
    maker = small_pipeline("toy")
    want = maker.encode(TEXTS, photo(5))
    copy = type(maker).from_pretrained(folder, config=maker.config, dtype=torch.float32)
    shipped = folder / "conditioning"
    assert copy.conditioning_cache.shipped is None  # the copy ships nothing yet
    cache = ConditioningCache(cache_dir, copy.conditioning_cache.mllm_folders, maker.config.embedder,
                              torch.float32, "cpu", shipped)
    cache.ship(TEXTS, photo(5), want)
    monkeypatch.setattr(conditioning_cache, "_version", lambda package: "another version")
    pipe = type(maker).from_pretrained(folder, config=maker.config, dtype=torch.float32)
    got = pipe.encode(TEXTS, photo(5))
    assert pipe.conditioning_entry.parent == shipped and not isinstance(pipe._embedder, torch.nn.Module)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    template = folder / "Qwen2.5-VL-7B-Instruct" / "chat_template.jinja"
    template.write_text(template.read_text() + " ")
    changed = type(maker).from_pretrained(folder, config=maker.config, dtype=torch.float32)
    changed.encode(TEXTS, photo(5))
    assert not changed.conditioning_from_cache  # another MLLM: the shipped entry is not its answer
