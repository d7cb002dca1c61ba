"""One object per model version, chosen from the config: every named config has one, it carries the whole
interface, and what a version refuses it refuses before any model work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from step1x_export.step1x_ref.configs import CONFIGS, get_config
from step1x_export.step1x_ref.edit_inputs import EditImage
from step1x_export.step1x_ref.versions import VERSIONS, EditVersion, edit_version
from step1x_export.validate import InputError


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_has_a_version(name):
    config = CONFIGS[name]
    version = edit_version(config)
    assert isinstance(version, EditVersion) and version.config is config
    assert version.dit_inputs[:3] == ("pe", "llm_embedding", "llm_mask")  # the dit spec's shared inputs first


def test_every_release_is_registered():
    assert set(VERSIONS) == {c.version for c in CONFIGS.values()}


def test_text_to_image_where_the_version_has_it():
    canvas = edit_version(get_config("tiny")).prepare(None, 64, width=64, height=48)
    assert isinstance(canvas, EditImage) and not canvas.has_reference and (canvas.width, canvas.height) == (64, 48)
    with pytest.raises(InputError, match="text-to-image is not supported for v1.2"):
        edit_version(get_config("tiny-v1.2")).prepare(None, 64, width=64, height=48)



def test_no_version_branch_outside_the_version_modules():
    """The flow, the pipeline, the runtime, the specs, the exporter and the CLI ask the version object; only the
    version modules and the configs may name a release's fields."""
    package = Path(__file__).resolve().parents[1] / "step1x_export"
    allowed = {package / "step1x_ref" / "configs.py", *(package / "step1x_ref" / "versions").glob("*.py")}
    branch = re.compile(r"reason_edit is (not )?None|\bv12\b")
    found = [f"{path.relative_to(package)}:{i}: {line.strip()}" for path in sorted(package.rglob("*.py"))
             if path not in allowed for i, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, "version branches outside step1x_ref/versions/:\n" + "\n".join(found)
