"""CPU threads: one `RuntimeOptions.threads` field (`--threads` on every runtime command), scoped to the edit
(torch's count is restored after), defaulting to one thread for a small model on the CPU, where more threads
only spin against each other and any other work (docs/design.md, "CPU threads")."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from step1x_export.cli import main
from step1x_export.cli.runtime_options import RuntimeArgs
from step1x_export.runtime import RuntimeOptions, Step1XEditRuntime
from step1x_export.threads import default_threads


def threads_during_edit(rt: Step1XEditRuntime) -> set[int]:
    seen: set[int] = set()
    rt.edit(Image.new("RGB", (32, 32)), "x", steps=1, size_level=32,
            progress=lambda done, total: seen.add(torch.get_num_threads()))
    return seen


@pytest.mark.parametrize(("asked", "during"), [(None, 1), (2, 2)])
def test_the_edit_runs_with_its_threads_and_gives_torchs_back(tiny_pipe, asked, during):
    before = torch.get_num_threads()
    rt = Step1XEditRuntime.from_pipeline(tiny_pipe, RuntimeOptions(precision="fp32", threads=asked))
    assert rt.options.threads == during  # what runs: the default resolved
    assert threads_during_edit(rt) == {during}
    assert torch.get_num_threads() == before


def test_the_default_follows_the_model_and_device():
    assert default_threads(small_model=True, device_type="cpu") == 1
    assert default_threads(small_model=False, device_type="cpu") is None  # torch's: one per core
    assert default_threads(small_model=True, device_type="cuda") is None


def test_threads_are_checked_and_reach_the_runtime_from_the_cli():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an integer >= 1"):
            RuntimeOptions(threads=bad)
    assert RuntimeArgs(model_name="tiny", threads=3).load_kwargs()["threads"] == 3
    result = CliRunner().invoke(main, ["edit", "--model", "tiny", "--threads", "0", "--image", "x.png",
                                       "--prompt", "x", "--out", "o.png"])
    assert result.exit_code == 2 and "--threads" in result.output
