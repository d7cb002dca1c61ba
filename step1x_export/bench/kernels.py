"""What the GPU kernels under the runtime really do: an 8-bit Linear timed as shipped (bf16 in, bf16 out; eager
and compiled, its activation-quantization pass apart from its GEMM, against the bf16 GEMM it replaces), the
form of the INT8 epilogue inductor generated, and which SDPA kernel a call ran.

INT8's GEMM (`_int_mm`) returns int32 [M, N]; the epilogue scales it, adds the bias and rounds to bf16. Fused
into the GEMM (a Triton template), no int32 [M, N] exists; as a separate pass it costs a write and a read of
4 M N bytes (about a fifth of an INT8 step at 1024^2). `int8_epilogue_form` reads inductor's generated code
and says which, and whether anything else keeps the int32 tensor (a second reader, a float32 [M, N]).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..calibrate.qlinear import _GEMMS, Kernel, QuantLinear, quantize_activation
from .measure import measure

SDPA_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_efficient_attention_forward",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math")


@dataclass(frozen=True)
class EpilogueForm:
    gemm: str  # "extern _int_mm" (cuBLASLt / CPU) or "template" (Triton, the epilogue in the GEMM)
    int32_mn: bool  # an int32 [M, N] buffer is allocated
    int32_readers: int  # kernels that read it (1: the epilogue alone)
    int32_returned: bool  # the graph hands it out (it outlives the layer)
    float32_mn: bool  # a float32 [M, N] buffer is allocated (an unfused float epilogue)

    @property
    def one_pass(self) -> bool:
        """The epilogue is fused into the GEMM, or one pass reads the int32 result once and nothing else."""
        return not self.float32_mn and (not self.int32_mn or self.int32_readers == 1 and not self.int32_returned)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"one_pass": self.one_pass}


def int8_epilogue_form(code: str, n: int) -> EpilogueForm:
    """The INT8 Linear's epilogue as inductor's generated wrapper `code` has it (N = the layer's outputs)."""
    def buffers(dtype: str) -> list[str]:
        return re.findall(rf"(buf\d+) = empty_strided\w*\(\(\w+, {n}\), \({n}, 1\), torch\.{dtype}\)", code)

    int32 = buffers("int32")
    calls = [line for line in code.splitlines() if "(" in line and "empty_strided" not in line
             and "reinterpret_tensor" not in line.split("(")[0] and not line.strip().startswith(("#", "del "))]
    def reads(line: str, b: str) -> bool:
        return re.search(rf"\b{b}\b", line) is not None and f"out={b}" not in line

    readers = sum(1 for line in calls for b in int32 if reads(line, b) and not line.strip().startswith("return"))
    returned = any(reads(line, b) for line in code.splitlines() if line.strip().startswith("return") for b in int32)
    return EpilogueForm(gemm="extern _int_mm" if "extern_kernels._int_mm" in code else "template",
                        int32_mn=bool(int32), int32_readers=readers, int32_returned=returned,
                        float32_mn=bool(buffers("float32")))


def compiled_int8_form(q: QuantLinear, x: Tensor, mode: str | None = None) -> EpilogueForm:
    """Compile the INT8 layer `q` as the runtime's blocks are compiled (rows dynamic) and read its epilogue."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.mark_dynamic(x, 0)
    with torch.inference_mode():
        _, codes = run_and_get_code(torch.compile(q, fullgraph=True, mode=mode), x)
    return int8_epilogue_form("\n".join(codes), q.out_features)


def shipped_layer_ms(q: QuantLinear, x: Tensor, runs: int = 5, compiled: bool = True) -> dict[str, float]:
    """`q` on the bf16 rows `x` as the runtime runs it: eager and (when `compiled`: a compile each) compiled, the
    activation quantization and the GEMM apart, and the bf16 GEMM of the same shape (no conversions in any)."""
    device = x.device
    time = lambda name, fn: measure(name, fn, device=device, runs=runs).median_ms  # noqa: E731
    weight = torch.empty(q.out_features, q.in_features, dtype=x.dtype, device=device).normal_()
    with torch.inference_mode():
        xq = quantize_activation(x, q._act_mul, q.fmt)
        out = {"bf16_linear_ms": time("bf16", lambda: F.linear(x, weight)),
               "eager_ms": time("eager", lambda: q(x)),
               "quantize_ms": time("quantize", lambda: quantize_activation(x, q._act_mul, q.fmt)),
               "gemm_ms": time("gemm", lambda: _GEMMS[q.kernel](xq, q))}
        if compiled:
            layer = torch.compile(q)
            torch._dynamo.mark_dynamic(x, 0)
            out["compiled_ms"] = time("compiled", lambda: layer(x))
        return out


def sdpa_kernels(fn: Callable[[], object]) -> list[str]:
    """The SDPA kernels `fn` dispatched (aten op names, in first-call order): what "auto" picked, compiled too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name.removeprefix("aten::") for e in prof.events()]
    return list(dict.fromkeys(n for n in names if n in SDPA_OPS))


__all__ = ["EpilogueForm", "Kernel", "compiled_int8_form", "int8_epilogue_form", "sdpa_kernels", "shipped_layer_ms"]
