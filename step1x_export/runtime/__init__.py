"""The lean runtime: engines (torch, ONNX Runtime, TensorRT), static buffers, CUDA graphs, and the app API.

    from step1x_export.runtime import Step1XEditRuntime
    with Step1XEditRuntime.load("tiny") as rt:
        out = rt.edit(image, "make the sky purple", steps=28, size_level=1024)
        print(rt.timer.table(), rt.peak_memory)
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "BufferPool": ".buffers",
    "BuildPlatform": ".trt_manifest",
    "CudaGraphed": ".cudagraph",
    "Engine": ".engine",
    "EngineMismatchError": ".trt_manifest",
    "ProfileError": ".buffers",
    "RuntimeOptions": ".options",
    "RuntimeStats": ".stats",
    "Step1XEditRuntime": ".runtime",
    "TorchEncoder": ".torch_engine",
    "TorchEngine": ".torch_engine",
    "check_compatible": ".trt_manifest",
    "check_dims": ".buffers",
    "edit_dims": ".buffers",
    "engine_step_fn": ".step",
    "plan_buffers": ".buffers",
    "profile_shapes": ".buffers",
    "select_profile": ".buffers",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
