"""Runtime memory pieces: the VAE read once per half, the driver-level peak, the LM head dropped."""

from __future__ import annotations

from dataclasses import replace

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


def test_a_preset_applies_to_the_api_as_to_the_cli():
    """`RuntimeOptions.preset`: its graphs (off), loading (the MLLM off the device while the DiT runs: swapped from
    host memory), MLLM format and batch, whoever builds the options."""
    from step1x_export.runtime import Step1XEditRuntime
    from step1x_export.runtime.options import RuntimeOptions

    options = RuntimeOptions(preset="24gb")
    assert (options.cuda_graphs, options.sequential_load, options.mllm_quant, options.max_batch) == (
        False, "host", "int8", 1)
    assert replace(options, compile=False) == replace(RuntimeOptions(preset="24gb"), compile=False)  # idempotent
    with pytest.raises(ValueError, match="max_batch 4 exceeds preset 24gb's batch 1"):
        RuntimeOptions(preset="24gb", max_batch=4)
    # what is still refused: a streamed preset where streaming cannot run (another backend, compile forced)
    with pytest.raises(ValueError, match="preset 16gb sets resident_blocks 40: resident_blocks streams the torch"):
        RuntimeOptions(preset="16gb", backend="onnxruntime")
    with pytest.raises(ValueError, match="preset 12gb sets resident_blocks 14: .* compile True"):
        RuntimeOptions(preset="12gb", compile=True)
    rt = Step1XEditRuntime.load("tiny", preset="22gb", device="cpu")
    try:
        assert rt.options.preset == "22gb" and rt.options.sequential_load == "host" and not rt.options.cuda_graphs
        assert rt.options.mllm_quant == "int8"
    finally:
        rt.close()


def test_load_checks_free_memory_and_names_a_preset_that_fits(monkeypatch):
    from step1x_export.presets import CUDA_CONTEXT, PRESETS, GiB
    from step1x_export.runtime.telemetry.memory import check_preset_memory

    free = {"bytes": 30 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 80 * GiB))
    cuda = torch.device("cuda")
    check_preset_memory("24gb", True, False, cuda)  # 30 GiB free: fits
    free["bytes"] = int(PRESETS["24gb"].planned_gib[0] * GiB) - CUDA_CONTEXT  # exactly the plan: fits
    check_preset_memory("24gb", True, False, cuda)
    free["bytes"] = 16 * GiB
    with pytest.raises(ValueError, match=r"preset 24gb plans 20.82 GiB at 1024\^2 \(v1.1\); cuda has 16.00 GiB free "
                                         r"after its CUDA context: --preset 22gb fits"):
        check_preset_memory("24gb", True, False, cuda)
    with pytest.raises(ValueError, match=r"plans 21.81 GiB at 1024\^2 \(v1.2 with thinking"):
        check_preset_memory("24gb", True, True, cuda)
    free["bytes"] = 2 * GiB
    with pytest.raises(ValueError, match="no preset fits"):
        check_preset_memory("8gb", True, False, cuda)
    check_preset_memory("24gb", False, False, cuda)  # tiny and toy models: the plan is the real model's
    check_preset_memory("24gb", True, False, torch.device("cpu"))


def test_serve_with_the_24gb_preset_runs_batches_of_one(monkeypatch, tmp_path):
    """`serve --preset 24gb` warms up and serves one edit per DiT call (the default is 4 where the runtime can
    batch): the batch its plan holds, at 1024^2 on meta (DiT activations at 2 rows = one edit's CFG pair)."""
    from click.testing import CliRunner

    import step1x_export.calibrate.qcheckpoint as qcheckpoint
    import step1x_export.serve.server as server
    from step1x_export.cli import main
    from step1x_export.plan.preset_plan import make_preset_plan, traced_activations
    from step1x_export.presets import PRESETS
    from step1x_export.runtime.options import RuntimeOptions

    served = {}
    monkeypatch.setattr(server, "run_server", lambda spec, limits, **kw: served.update(spec=spec, limits=limits))
    monkeypatch.setattr(qcheckpoint, "read_qcheckpoint_info", lambda path: {"config": "tiny"})
    q = tmp_path / "q.safetensors"
    q.write_bytes(b"")
    args = ["serve", "--model", "tiny", "--preset", "24gb", "--quant", str(q), "--device", "cpu"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    spec = served["spec"]
    assert spec.options["max_batch"] == 1 and served["limits"].warmup
    options = RuntimeOptions(**{k: v for k, v in spec.options.items() if k in ("preset", "max_batch")})
    assert options.max_batch == 1 and not options.cuda_graphs
    run = CliRunner().invoke(main, [*args, "--max-batch", "4"])
    assert run.exit_code == 2 and "--max-batch 4 exceeds --preset 24gb's batch 1" in run.output
    plan = make_preset_plan("24gb", size_level=1024)
    dit = next(s for s in plan.stages if s.name == "dit")
    assert PRESETS["24gb"].max_batch == 1 and dit.activations == traced_activations("v1.1", "dit", 1024, 1024, "fp8", 2)
    assert plan.fits()
