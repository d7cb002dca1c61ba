"""What first light reads off the GPU kernels, checked on CPU: the INT8 epilogue's form in inductor's code for
dynamic rows (one pass over the int32 GEMM result, nothing else keeping it; a second reader is caught), and a
ladder row with another attention kernel tracing the compiled blocks afresh instead of timing the last row's."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from step1x_export.bench import ladder
from step1x_export.bench.kernels import compiled_int8_form, int8_epilogue_form
from step1x_export.bench.ladder import LadderRow, LadderSettings, ModelState, run_cell
from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qlinear import Kernel, QuantLinear
from step1x_export.runtime.options import RuntimeOptions


def int8_layer() -> QuantLinear:
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 48).bfloat16(), QuantFormat.INT8, input_scale=torch.tensor(0.02),
                                weight_scale=torch.rand(48) * 1e-2 + 1e-3, smooth=torch.rand(64) + 0.5)
    return q.use_kernel(Kernel.INT_MM)  # the CUDA kernel's graph, run by CPU's _int_mm


def test_the_int8_epilogue_is_one_pass_over_the_gemm_result_for_dynamic_rows():
    form = compiled_int8_form(int8_layer(), torch.randn(40, 64).bfloat16())
    # CPU's inductor keeps _int_mm an extern kernel (as cuBLASLt does on a GPU): its int32 [M, N] is read once,
    # by the fused scale + bias + bf16 rounding, and no float32 [M, N] is made.
    assert (form.gemm, form.int32_mn, form.int32_readers, form.float32_mn) == ("extern _int_mm", True, 1, False)
    assert not form.int32_returned
    assert form.one_pass


def test_a_second_reader_of_the_int32_result_is_caught():
    from torch._inductor.utils import run_and_get_code

    q = int8_layer()

    def kept(xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = torch._int_mm(xq, q.weight.t())
        return (acc * q._out_scale).to(torch.bfloat16), acc  # the int32 result outlives the layer

    xq = torch.randint(-8, 8, (40, 64), dtype=torch.int8)
    torch._dynamo.mark_dynamic(xq, 0)
    _, codes = run_and_get_code(torch.compile(kept, fullgraph=True), xq)
    form = int8_epilogue_form("\n".join(codes), 48)
    assert form.int32_mn and form.int32_returned and not form.one_pass


def test_a_compiled_row_with_another_attention_kernel_traces_the_blocks_afresh(monkeypatch):
    resets: list[int] = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr("step1x_export.bench.runtimes.bench_runtime", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("no runtime in this test")))
    settings = LadderSettings(base=RuntimeOptions(cuda_graphs=False), compile_on_cpu=True)
    models, x, state = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(size=32), ModelState()
    rows = [LadderRow("+ compile", {"compile": True}, ""), LadderRow("again", {"compile": True}, ""),
            LadderRow("+ cuDNN attention", {"compile": True, "attention": "cudnn"}, ""),
            LadderRow("eager flash", {"compile": False, "attention": "flash"}, "")]
    for row in rows:
        assert run_cell(row, models, x, state, settings).error.startswith("RuntimeError: no runtime in this test")
    assert resets == [1] and state.traced_attention == "cudnn"  # eager rows trace nothing
    assert ladder.trace_afresh(RuntimeOptions(compile=True, attention="auto"), state) and resets == [1, 1]


def test_the_shipped_layer_timings_run_the_int8_kernel_on_bf16_rows():
    from step1x_export.bench.kernels import shipped_layer_ms

    ms = shipped_layer_ms(int8_layer(), torch.randn(40, 64).bfloat16(), runs=1, compiled=False)
    assert set(ms) == {"bf16_linear_ms", "eager_ms", "quantize_ms", "gemm_ms"} and all(v > 0 for v in ms.values())
