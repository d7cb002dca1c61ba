"""torch.compile of the DiT's transformer blocks, one compiled graph per block type for every edit size.

The token counts change with the edit: the image tokens (noisy + reference) with its resolution, and,
for v1.2, the text tokens with the prompt (each CFG branch keeps its own length, unpadded). Both are
marked dynamic on each block's inputs, so a server that sees every aspect ratio and every prompt
compiles each block type once (a static compile recompiles per token count and, with fullgraph,
fails at dynamo's recompile limit). Batch and widths stay static, so the kernels are specialised on them.

One `CompileBackend` per process and mode (`compile_backend`): dynamo guards its cache entries on the
backend object, so a backend per runtime would recompile every block for each runtime a process makes
(the benchmark ladder makes one per row).

Per block rather than the whole model: compile time stays that of one block per type, and the
connector and embedders (run once per step on small tensors) stay eager.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Input name -> its token dimension, for the blocks' forward arguments (img / txt / x: [B, tokens, hidden],
# pe: [1, 1, tokens, D/2, 2, 2]). v1.0 / v1.1 pad the text to a fixed length; v1.2 does not.
TOKEN_DIMS = {"img": 1, "txt": 1, "x": 1, "pe": 2}
BLOCK_LISTS = ("double_blocks", "single_blocks")
_MARK = "_step1x_compiled"  # set on blocks compiled here, so closing the engine can restore them


class CompileBackend:
    """Inductor, counting the graphs it compiles (the runtime's `stats().compiles`).

    `mode` is torch.compile's mode; inductor's own CUDA graphs stay off whatever the mode, because the
    runtime captures the whole denoising step itself (a graph inside a capture would fail).
    """

    def __init__(self, mode: str | None = None):
        self.mode = mode
        self.options: dict[str, Any] = dict(torch._inductor.list_mode_options(mode)) if mode else {}
        self.options["triton.cudagraphs"] = False
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs, config_patches=self.options)


_BACKENDS: dict[str | None, CompileBackend] = {}


def compile_backend(mode: str | None = None) -> CompileBackend:
    """The process's backend for `mode` (made on first use): every runtime compiling with it shares
    dynamo's cache entries, so a second runtime over the same block types compiles nothing."""
    if mode not in _BACKENDS:
        _BACKENDS[mode] = CompileBackend(mode)
    return _BACKENDS[mode]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for name in BLOCK_LISTS for block in getattr(model, name)]


def compile_blocks(model: nn.Module, backend: CompileBackend) -> nn.Module:
    """Compile each transformer block in place, its token dimension dynamic; returns `model`."""
    import torch._dynamo

    # Cache entries are per block type x dtype x (quantized or not); sizes no longer multiply them, but a
    # process that runs several precisions (the benchmark ladder) needs more than dynamo's default 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _settle_kernels(model)
    for block in transformer_blocks(model):
        compiled = torch.compile(block._call_impl, backend=backend, fullgraph=True, dynamic=False)
        # What nn.Module.compile sets, with the token dimension marked dynamic on every call first.
        block._compiled_call_impl = _marking_dynamic_tokens(compiled, block.forward)
        setattr(block, _MARK, True)
    return model


def _settle_kernels(model: nn.Module) -> None:
    """Make quantized layers pick their GEMM now: picked lazily inside a compiled block, the choice would
    change a guarded attribute after the first call and recompile every block once more."""
    from ...calibrate.qlinear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            _ = module.kernel


def uncompile_blocks(model: nn.Module) -> None:
    """Restore the blocks `compile_blocks` compiled to eager (a shared module is handed back as it came)."""
    for module in model.modules():
        if getattr(module, _MARK, False):
            module._compiled_call_impl = None
            delattr(module, _MARK)


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(m, _MARK, False) for m in model.modules())


def _marking_dynamic_tokens(compiled: Callable[..., Any], forward: Callable[..., Any]) -> Callable[..., Any]:
    positions = {name: i for i, name in enumerate(inspect.signature(forward).parameters)}
    marks = [(name, positions[name], dim) for name, dim in TOKEN_DIMS.items() if name in positions]

    def call(*args: Any, **kwargs: Any) -> Any:
        for name, position, dim in marks:
            tensor = kwargs.get(name, args[position] if position < len(args) else None)
            if isinstance(tensor, torch.Tensor):
                # "maybe": a graph that must specialise on the size recompiles instead of failing; the
                # runtime's compile count (and its test over 12 sizes) shows whether that happens.
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(*args, **kwargs)

    return call
