"""ONNX export + ONNX Runtime: per-component parity, a whole edit, external data, manifest checks.

One export of the tiny model per module (the dynamo exporter takes seconds per graph); every
dynamic-shape check runs several sizes and aspect ratios through that one set of graphs.
"""

from __future__ import annotations

import json
import shutil
import uuid

import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import EXTERNAL_THRESHOLD
from test_runtime import edit_and_latent, rel_err

from step1x_export.cli.export import export as export_cmd
from step1x_export.export import ExportError, export_components, load_manifest
from step1x_export.export.components import example_image, pad_batch
from step1x_export.export.manifest import META_EXPORT_ID
from step1x_export.export.qwen import llm_position_ids, vision_inputs
from step1x_export.hashing import file_sha256
from step1x_export.runtime import Step1XEditRuntime
from step1x_export.runtime.engines.engine import Engine
from step1x_export.runtime.engines.onnxruntime import OrtEngine
from step1x_export.specs import COMPONENTS
from step1x_export.step1x_ref import pipeline as pipeline_module
from step1x_export.step1x_ref.dit.math import rope_table
from step1x_export.step1x_ref.pipeline import Step1XEditPipeline
from step1x_export.step1x_ref.sampling import position_ids

pytestmark = pytest.mark.xdist_group("tiny_export")  # shares the session's one tiny export
FP32_TOL = 1e-4  # one graph call vs torch, fp32
LATENT_TOL = 1e-5  # a whole edit's final latent vs torch, fp32
# (width, height): two resolutions x two aspect ratios, all from one graph per component
SIZES = [(32, 32), (64, 64), (96, 48), (48, 80)]


@pytest.fixture(scope="module")
def pipe(tiny_pipe) -> Step1XEditPipeline:
    return tiny_pipe


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def manifest(export_dir):
    return load_manifest(export_dir)


@pytest.fixture(scope="module")
def engines(manifest) -> dict[str, OrtEngine]:
    return {n: OrtEngine.from_manifest(manifest, n, providers=["CPUExecutionProvider"]) for n in COMPONENTS}


def test_engines_follow_the_protocol_and_names(engines, manifest, pipe):
    assert all(isinstance(e, Engine) for e in engines.values())
    graph = onnx.load(manifest.components["dit"].path)
    inits = {i.name for i in graph.graph.initializer}
    weights = [n for n, p in pipe.model.named_parameters() if p.dim() == 2]
    missing = [n for n in weights if n not in inits]
    print(f"dit: {len(weights) - len(missing)}/{len(weights)} 2-D weights keep their torch names")
    assert not missing


@pytest.mark.isa
@pytest.mark.parametrize("size", SIZES)
def test_dit_parity(engines, pipe, size):
    c = pipe.config
    w, h = size
    n_h, n_w = h // 16, w // 16
    gen = torch.Generator().manual_seed(w * h)
    txt = c.embedder.max_length
    mask = (torch.arange(txt) < 9 + w // 16).long().expand(2, -1).contiguous()
    args = dict(
        img=torch.randn(2, 2 * n_h * n_w, 64, generator=gen),
        pe=rope_table(position_ids(txt, n_h, n_w, c.version), c.dit.axes_dim, c.dit.theta),
        timestep=torch.tensor([0.7, 0.7]),
        llm_embedding=torch.randn(2, txt, c.embedder.hidden_size, generator=gen),
        llm_mask=mask,
    )
    with torch.inference_mode():
        ref = pipe.model(**args)
    err = rel_err(engines["dit"](**args)["pred"], ref)
    print(f"dit {w}x{h}: max rel err {err:.2e}")
    assert err <= FP32_TOL


@pytest.mark.isa
@pytest.mark.parametrize("size", SIZES)
def test_vae_parity(engines, pipe, size):
    w, h = size
    gen = torch.Generator().manual_seed(w + h)
    batch = 1 if w == h else 2
    image = torch.rand(batch, 3, h, w, generator=gen) * 2 - 1
    with torch.inference_mode():
        latent_ref = pipe.ae.encode(image)
        image_ref = pipe.ae.decode(latent_ref)
    enc = rel_err(engines["vae_encoder"](image=image)["latent"], latent_ref)
    dec = rel_err(engines["vae_decoder"](latent=latent_ref)["image"], image_ref)
    print(f"vae {w}x{h} batch {batch}: encoder {enc:.2e}, decoder {dec:.2e}")
    assert enc <= FP32_TOL and dec <= FP32_TOL


# Source images of several aspect ratios: the processor gives grids of 256-324 tokens of different shapes.
MLLM_IMAGES = [(64, 64), (96, 64), (64, 128), (200, 90)]


@pytest.mark.isa
@pytest.mark.parametrize("size", MLLM_IMAGES)
def test_mllm_parity(engines, pipe, size):
    emb = pipe.embedder
    image = example_image(*size, seed=size[0])
    cond = emb.prepare('Write "HELLO" on the wall', image)
    uncond = emb.prepare("", image)
    grid = cond.image_grid_thw
    with torch.inference_mode():
        feats_ref = emb.encode_image(cond.pixel_values, grid)
        hidden_ref = [emb.last_hidden_state(x, feats_ref) for x in (cond, uncond)]
    feats = engines["vision"](pixel_values=cond.pixel_values, **vision_inputs(grid, emb.model.config.vision_config))
    feats = feats["image_embeds"]
    ids, mask = pad_batch([cond.input_ids[0], uncond.input_ids[0]], [cond.attention_mask[0], uncond.attention_mask[0]])
    pos = llm_position_ids(ids, mask, grid, emb.model.config)
    hidden = engines["llm"](input_ids=ids, attention_mask=mask, position_ids=pos, image_embeds=feats_ref)
    hidden = hidden["last_hidden_state"]
    v_err = rel_err(feats, feats_ref)
    l_err = max(rel_err(hidden[i : i + 1, : r.shape[1]], r) for i, r in enumerate(hidden_ref))
    print(f"mllm {size} grid {grid.tolist()}: vision {v_err:.2e}, llm (batch 2, padded) {l_err:.2e}")
    assert v_err <= FP32_TOL and l_err <= FP32_TOL


@pytest.mark.isa
def test_whole_edit_through_ort_matches_torch(export_dir, pipe):
    """The same edit from the export's five graphs (ORT) and from torch: final latents within fp32 rounding."""
    image = example_image(80, 56, seed=7)
    kwargs = dict(seed=3, steps=4, cfg=4.0, size_level=64)
    ref, ref_latent = edit_and_latent(pipeline_module, pipe.edit, image, 'Make the "sky" purple', **kwargs)
    with Step1XEditRuntime.load(export_dir, backend="onnxruntime", device="cpu") as rt:  # MLLM from its graphs too
        assert any("vision + llm graphs" in n for n in rt.notes)
        got = rt.edit(image, 'Make the "sky" purple', **kwargs)
        latent = rt.last_latent
    err = rel_err(latent, ref_latent)
    print(f"whole tiny edit (ORT CPU vs torch, fp32): final latent max rel err {err:.2e}")
    assert got.size == ref.size == image.size
    assert float(ref_latent.std()) > 0.1  # a latent with structure, not a constant any graph would match
    assert err <= LATENT_TOL


def test_external_data_written_and_loaded(manifest, export_dir):
    for name in ("vae_encoder", "vae_decoder"):
        entry = manifest.components[name]
        data = export_dir / f"{entry.file}.data"
        assert data.is_file() and data.name in entry.files
        assert data.stat().st_size > EXTERNAL_THRESHOLD > (export_dir / entry.file).stat().st_size
    assert list(manifest.components["dit"].files) == ["dit.onnx"]
    # ORT loads the external-data graphs back (the VAE parity tests run them); onnx does too:
    graph = onnx.load(manifest.components["vae_decoder"].path)
    assert sum(i.ByteSize() for i in graph.graph.initializer) > EXTERNAL_THRESHOLD


@pytest.fixture
def copy_of(export_dir, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(export_dir, dst)
    return dst


def test_manifest_detects_a_changed_file(copy_of):
    with open(copy_of / "vae_decoder.onnx.data", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ExportError, match=r"vae_decoder.*changed"):
        load_manifest(copy_of)


def test_truncated_graph_is_refused_by_its_checksum_not_by_protobuf(copy_of):
    graph = copy_of / "dit.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ExportError, match=r"'dit'.*dit.onnx changed since it was written \(sha256 mismatch\)"):
        load_manifest(copy_of)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("file", "../../../../etc/passwd", "outside the folder"),
    ("file", "/etc/hostname", "outside the folder"),
    ("files", {}, r"\$\.components\.dit\.files: \{\} should be non-empty"),
])
def test_manifest_naming_files_outside_or_no_checksums_is_refused(copy_of, field, value, message):
    data = json.loads((copy_of / "manifest.json").read_text())
    data["components"]["dit"][field] = value
    (copy_of / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=message):
        load_manifest(copy_of)


def test_missing_graph_names_component_and_shapes(copy_of):
    (copy_of / "llm.onnx").unlink()
    with pytest.raises(ExportError, match=r"'llm'.*missing.*input_ids \[batch 1\.\.2, llm_seq \d+\.\.\d+\]"):
        load_manifest(copy_of)


def test_graph_from_another_export_is_refused(copy_of):
    """A graph of another export, even listed with its own checksum, is refused by its export id."""
    graph = onnx.load(copy_of / "dit.onnx")
    for prop in graph.metadata_props:
        if prop.key == META_EXPORT_ID:
            prop.value = uuid.uuid4().hex
    onnx.save(graph, copy_of / "dit.onnx")
    with pytest.raises(ExportError, match=r"'dit'.*dit.onnx changed since it was written"):
        load_manifest(copy_of)
    data = json.loads((copy_of / "manifest.json").read_text())
    data["components"]["dit"]["files"]["dit.onnx"] = file_sha256(copy_of / "dit.onnx")
    (copy_of / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=r"'dit'.*another export.*img \[batch 1\.\.2, img_tokens"):
        load_manifest(copy_of)


def test_no_manifest_is_not_an_export(copy_of):
    (copy_of / "manifest.json").unlink()
    with pytest.raises(ExportError, match="not a valid export"):
        load_manifest(copy_of)


def test_shapes_outside_profile(manifest, engines):
    lo, _, hi = manifest.components["dit"].dims["img_tokens"]
    shapes = {"img": (2, hi + 2, 64), "pe": (1, 1, 640 + hi + 2, 16, 2, 2), "timestep": (2,),
              "llm_embedding": (2, 640, 64), "llm_mask": (2, 640)}
    with pytest.raises(ExportError, match=rf"dit: input img .* expected img \[batch 1\.\.2, img_tokens {lo}\.\.{hi}"):
        manifest.check_shapes("dit", shapes)
    with pytest.raises(ExportError, match=r"vae_decoder: input latent"):
        engines["vae_decoder"](latent=torch.zeros(1, 16, 2, 1000))


def test_export_refuses_to_overwrite(export_dir, pipe):
    with pytest.raises(FileExistsError, match="force"):
        export_components(pipe, export_dir, components=["dit"], progress=False)
    result = CliRunner().invoke(export_cmd, ["--model", "tiny", "--out", str(export_dir), "--components", "dit"])
    assert result.exit_code != 0 and "--force" in result.output
    assert "--components" in CliRunner().invoke(export_cmd, ["--help"]).output


def test_large_graph_path_infers_shapes_from_the_file(pipe, tmp_path, monkeypatch):
    """Graphs past protobuf's 2 GB limit cannot be shape-inferred in memory; forcing that path on the tiny
    DiT checks the file-based inference and the external data it implies still give a correct graph."""
    from step1x_export.export import onnx_io

    monkeypatch.setattr(onnx_io, "INFER_IN_MEMORY_LIMIT", 0)
    manifest = export_components(pipe, tmp_path / "big", components=["dit"], progress=False)
    entry = manifest.components["dit"]
    assert "dit.onnx.data" in entry.files  # weights went to external data
    graph = onnx.load(entry.path, load_external_data=False)
    assert len(graph.graph.value_info) > 0  # shapes were inferred (from the file)
    engine = OrtEngine.from_manifest(load_manifest(tmp_path / "big"), "dit", providers=["CPUExecutionProvider"])
    cfg = pipe.config
    n, txt = 16, cfg.embedder.max_length
    inputs = {
        "img": torch.randn(2, 2 * n, 64),
        "pe": rope_table(position_ids(txt, 4, 4, cfg.version), cfg.dit.axes_dim, cfg.dit.theta),
        "timestep": torch.tensor([0.6, 0.6]),
        "llm_embedding": torch.randn(2, txt, cfg.embedder.hidden_size),
        "llm_mask": torch.ones(2, txt, dtype=torch.long),
    }
    with torch.no_grad():
        want = pipe.model(*inputs.values())
    assert rel_err(engine(**inputs)["pred"], want) <= FP32_TOL
