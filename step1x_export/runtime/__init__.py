"""The lean runtime: engines (torch, ONNX Runtime, TensorRT), static buffers, CUDA graphs, and the app API.

    from step1x_export.runtime import Step1XEditRuntime
    with Step1XEditRuntime.load("tiny") as rt:
        out = rt.edit(image, "make the sky purple", steps=28, size_level=1024)
        print(rt.timer.table(), rt.peak_memory)
"""

from .buffers import BufferPool, ProfileError, check_dims, edit_dims, plan_buffers, profile_shapes, select_profile
from .cudagraph import CudaGraphed
from .engine import Engine
from .options import RuntimeOptions
from .runtime import Step1XEditRuntime
from .step import engine_step_fn
from .torch_engine import TorchEncoder, TorchEngine
from .trt_manifest import BuildPlatform, EngineMismatchError, check_compatible

__all__ = [
    "BufferPool", "BuildPlatform", "CudaGraphed", "Engine", "EngineMismatchError", "ProfileError", "RuntimeOptions",
    "Step1XEditRuntime", "TorchEncoder", "TorchEngine", "check_compatible", "check_dims", "edit_dims",
    "engine_step_fn", "plan_buffers", "profile_shapes", "select_profile",
]
