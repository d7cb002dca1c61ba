"""Runtime memory pieces: the VAE read once per half, the driver-level peak, the LM head dropped."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from step1x_export.runtime.loaders import _vae_half
from step1x_export.runtime.telemetry.memory import DriverMemory, read_peak
from step1x_export.step1x_ref.weights.loading import CheckpointError, ModelFiles


def test_each_vae_stage_loads_only_its_half(tiny_pipe, tmp_path):
    path = tmp_path / "vae.safetensors"
    state = {k: v.contiguous() for k, v in tiny_pipe.ae.state_dict().items()}
    save_file(state, str(path))
    files = ModelFiles(dit=tmp_path / "dit", vae=path, qwen=tmp_path / "qwen")
    for half in ("encoder", "decoder"):
        ae = _vae_half(files, tiny_pipe.config, half, torch.device("cpu"))
        other = "decoder" if half == "encoder" else "encoder"
        assert all(p.device.type == "meta" for p in getattr(ae, other).parameters())  # never read
        for k, v in getattr(ae, half).state_dict().items():
            assert torch.equal(v, state[f"{half}.{k}"]), k
    save_file({**state, "quant_conv.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="unexpected keys: quant_conv.weight"):
        _vae_half(files, tiny_pipe.config, "encoder", torch.device("cpu"))


def test_driver_peak_is_gpu_only():
    driver = DriverMemory(torch.device("cpu"))
    driver.sample()
    peak = read_peak(torch.device("cpu"), driver)
    assert driver.peak is None and peak.driver_bytes is None and "process peak RSS" in str(peak)
