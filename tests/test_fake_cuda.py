"""The GPU branch of the shipped configurations, run on fake CUDA (an H200 as far as the code can tell):
full-width DiT blocks at the token counts of real edits, every kernel call through ATen's checks and the
layouts the CUDA GEMMs need, and each block traced by dynamo as one graph (what `compile(fullgraph=True)` does).

v1.1 runs at batch 2 (true CFG), text padded to 640, at 1024^2 and two other aspect ratios (1360x768 and
1168x880: the latter's 2 x 8670 rows are not a multiple of 16); v1.2 runs one CFG branch at a time (batch 1),
each with its own unpadded text length.
"""

from __future__ import annotations

import pytest
import torch
from fake_cuda import GemmLog, fake_h200
from torch import nn

from step1x_export.calibrate.formats import QuantFormat
from step1x_export.calibrate.qcheckpoint import swap_on_meta
from step1x_export.calibrate.qlinear import Kernel, QuantLinear
from step1x_export.calibrate.weight_only import WeightOnlyLinear
from step1x_export.plan.stages import dit_layout
from step1x_export.runtime.engines.compile import CompileBackend, compile_blocks
from step1x_export.step1x_ref.configs import get_config
from step1x_export.step1x_ref.dit.layers import DoubleStreamBlock, SingleStreamBlock

DIT = get_config("v1.1").dit
HIDDEN, HEADS = DIT.hidden_size, DIT.num_heads
HEAD_DIM = HIDDEN // HEADS
BF16 = torch.bfloat16
V11_TEXT = 640
# (width, height) of 1024-level edits: square, 16:9 from 1920x1080, 4:3 from 1600x1200 (image tokens odd)
V11_SIZES = [(1024, 1024), (1360, 768), (1168, 880)]
V12_TEXT = [217, 38]  # two prompts' unpadded lengths (one CFG branch each)
RECIPE_KERNEL = {"fp8": Kernel.SCALED_MM, "int8-sq": Kernel.INT_MM}


class Blocks(nn.Module):
    """One double and one single block at full width, under the names the DiT gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(HIDDEN, HEADS, DIT.mlp_ratio, DIT.qkv_bias)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(HIDDEN, HEADS, DIT.mlp_ratio)])


def meta_blocks(recipe: str | None) -> Blocks:
    """The shipped layout (W8A8 default selection + int8 weight-only modulation), on meta (build it outside
    the fake mode: a fake meta parameter cannot be swapped for its bf16 copy)."""
    with torch.device("meta"):
        blocks = Blocks().to(BF16)
    return swap_on_meta(blocks, dit_layout(blocks, recipe, QuantFormat.INT8), BF16)


def on_cuda(module: nn.Module) -> nn.Module:
    """Move to fake CUDA (call under `fake_h200`): moving picks each 8-bit layer's kernel, as loading does."""
    return module.to_empty(device="cuda").requires_grad_(False)


def image_tokens(width: int, height: int) -> int:
    return 2 * (width // 16) * (height // 16)  # noisy + reference


def block_inputs(batch: int, text: int, img: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    def t(*shape, dtype=BF16):
        return torch.empty(*shape, dtype=dtype, device=device)

    return {"img": t(batch, img, HIDDEN), "txt": t(batch, text, HIDDEN), "vec": t(batch, HIDDEN),
            "pe": t(1, 1, text + img, HEAD_DIM // 2, 2, 2, dtype=torch.float32)}


def run_blocks(blocks: Blocks, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    img, txt = blocks.double_blocks[0](**inputs)
    return blocks.single_blocks[0](torch.cat((txt, img), 1), vec=inputs["vec"], pe=inputs["pe"])


def shapes() -> list[tuple[str, int, int, int]]:
    cases = [(f"v1.1 {w}x{h}", 2, V11_TEXT, image_tokens(w, h)) for w, h in V11_SIZES]
    return cases + [(f"v1.2 text {n}", 1, n, image_tokens(1024, 1024)) for n in V12_TEXT]


def test_the_shapes_include_awkward_row_counts():
    rows = [b * (t + n) for _, b, t, n in shapes()]
    assert any(m % 16 for m in rows) and any(m % 256 for m in rows)


@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
@pytest.mark.parametrize(("k", "n", "m"), [(HIDDEN, 21504, 17340), (15360, HIDDEN, 17340), (HIDDEN, 9216, 5)])
def test_quant_linear_runs_the_h200_kernel(recipe, k, n, m):
    fmt = QuantFormat.FP8_E4M3 if recipe == "fp8" else QuantFormat.INT8
    q = QuantLinear(k, n, fmt, bias=True, per_channel=True, smooth=recipe == "int8-sq", dtype=BF16, device="meta")
    with fake_h200():
        on_cuda(q)
        assert q.kernel is RECIPE_KERNEL[recipe]
        with GemmLog() as log:
            y = q(torch.randn(m, k, dtype=BF16, device="cuda"))
        assert (y.shape, y.dtype, y.device.type) == ((m, n), BF16, "cuda")
        assert log.ops() == [RECIPE_KERNEL[recipe].value]
        weight_stride = log.calls[0].strides[1]
        assert weight_stride == (1, k)  # the [N, K] weight handed over transposed: column-major [K, N]


@pytest.mark.parametrize(("out_dtype", "bias_dtype", "refused"), [
    (torch.float32, None, "row-wise scaling needs a bf16 output"),
    (BF16, torch.float32, "bias must have the output's dtype"),
    (BF16, BF16, None)])
def test_scaled_mm_is_held_to_the_cuda_rules_the_meta_function_misses(out_dtype, bias_dtype, refused):
    m, k, n = 32, 64, 48
    with fake_h200():
        a = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
        b = torch.empty(n, k, device="cuda", dtype=torch.float8_e4m3fn).t()
        scale_a, scale_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        bias = None if bias_dtype is None else torch.zeros(n, device="cuda", dtype=bias_dtype)
        call = lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)  # noqa: E731
        call()  # ATen's meta checks alone let every case through
        with GemmLog():
            if refused is None:
                assert call().dtype == BF16
            else:
                with pytest.raises(RuntimeError, match=refused):
                    call()


def test_a_quant_linear_cast_to_bf16_meets_the_scaled_mm_rules():
    """An FP8 layer built in fp32 and cast to bf16 (as a model's `.to(torch.bfloat16)`): its bias and output go
    bf16 together, so the row-wise kernel gets a bf16 output and a bf16 bias."""
    q = QuantLinear(HIDDEN, 9216, QuantFormat.FP8_E4M3, bias=True, per_channel=True, device="meta")
    with fake_h200():
        on_cuda(q).to(BF16)
        assert q.kernel is Kernel.SCALED_MM
        with GemmLog() as log:
            q(torch.randn(40, HIDDEN, dtype=BF16, device="cuda"))
        assert log.ops() == ["scaled_mm"]


@pytest.mark.parametrize("fmt", [QuantFormat.INT8, QuantFormat.FP8_E4M3])
def test_weight_only_layer_runs_a_bf16_gemm(fmt):
    layer = WeightOnlyLinear(HIDDEN, 6 * HIDDEN, fmt, bias=True, dtype=BF16, device="meta")
    with fake_h200():
        on_cuda(layer)
        with GemmLog() as log:
            y = layer(torch.randn(2, HIDDEN, dtype=BF16, device="cuda"))
        assert (y.shape, y.dtype) == ((2, 6 * HIDDEN), BF16)
        assert log.ops() == ["addmm"] and log.calls[0].dtypes == (BF16, BF16, BF16)


@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
def test_blocks_run_on_h200_at_real_token_counts(recipe):
    blocks = meta_blocks(recipe)
    with fake_h200():
        on_cuda(blocks)
        quantized = [m for m in blocks.modules() if isinstance(m, QuantLinear)]
        assert quantized and {m.kernel for m in quantized} == {RECIPE_KERNEL[recipe]}
        weight_only = [m for m in blocks.modules() if isinstance(m, WeightOnlyLinear)]
        assert len(weight_only) == 3  # img_mod, txt_mod, modulation
        for name, batch, text, img in shapes():
            with GemmLog() as log:
                out = run_blocks(blocks, block_inputs(batch, text, img))
            assert out.shape == (batch, text + img, HIDDEN), name
            eight_bit = [c for c in log.calls if c.op == RECIPE_KERNEL[recipe].value]
            assert len(eight_bit) == len(quantized), name  # every W8A8 layer on its 8-bit kernel, once
            assert all(c.dtypes[0] == BF16 for c in log.calls if c.op in ("mm", "addmm")), name  # no fp32 GEMM


def traced_graphs(blocks: Blocks, inputs: dict[str, torch.Tensor]) -> list[torch.fx.GraphModule]:
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def double(img, txt, vec, pe):
        return blocks.double_blocks[0](img=img, txt=txt, vec=vec, pe=pe)

    def single(x, vec, pe):
        return blocks.single_blocks[0](x, vec=vec, pe=pe)

    torch._dynamo.reset()
    img, txt = torch.compile(double, backend=record, fullgraph=True, dynamic=False)(**inputs)
    torch.compile(single, backend=record, fullgraph=True, dynamic=False)(torch.cat((txt, img), 1), inputs["vec"],
                                                                          inputs["pe"])
    torch._dynamo.reset()
    return graphs


def traceable_blocks(recipe: str) -> Blocks:
    """The blocks on meta with the 8-bit layers on the kernels an H200 picks (as `test_blocks_run_on_h200...`
    shows it does): dynamo traces meta tensors without asking for a CUDA device."""
    blocks = meta_blocks(recipe)
    for m in blocks.modules():
        if isinstance(m, QuantLinear):
            m.use_kernel(RECIPE_KERNEL[recipe])
    return blocks.requires_grad_(False)


@pytest.mark.parametrize(("recipe", "case"), [("fp8", 2), ("int8-sq", 2)])
def test_each_block_traces_as_one_graph_with_the_h200_kernels(recipe, case):
    name, batch, text, img = shapes()[case]
    with torch.no_grad():
        graphs = traced_graphs(traceable_blocks(recipe), block_inputs(batch, text, img, "meta"))
    assert len(graphs) == 2, name
    kernel = {Kernel.SCALED_MM: torch._scaled_mm, Kernel.INT_MM: torch._int_mm}[RECIPE_KERNEL[recipe]]
    calls = [sum(node.target is kernel for node in gm.graph.nodes) for gm in graphs]
    assert calls == [8, 2], name  # double: qkv, proj, mlp x2 for img and txt; single: linear1, linear2


class CountingBackend(CompileBackend):
    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


@pytest.mark.parametrize("version", ["v1.1", "v1.2"])
def test_runtime_compile_serves_every_shape_with_one_graph_per_block_type(version):
    """`compile_blocks` as the runtime calls it (fullgraph, token counts marked dynamic) over the version's
    shapes: one compile per block type, none per size or prompt length."""
    cases = [c for c in shapes() if c[0].startswith(version)]
    blocks = traceable_blocks("fp8")
    backend = CountingBackend()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compile_blocks(blocks, backend)
            for name, batch, text, img in cases:
                out = run_blocks(blocks, block_inputs(batch, text, img, "meta"))
                assert out.shape == (batch, text + img, HIDDEN), name
    finally:
        torch._dynamo.reset()
    assert backend.compiles == 2
