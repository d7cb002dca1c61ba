"""The lean runtime: engines (torch, ONNX Runtime, TensorRT), static buffers, CUDA graphs, and the app API.

    from step1x_export.runtime import Step1XEditRuntime
    with Step1XEditRuntime.load("tiny") as rt:
        out = rt.edit(image, "make the sky purple", steps=28, size_level=1024)
        print(rt.timer.table(), rt.peak_memory)
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "BufferPool": ".engines.buffers",
    "BuildPlatform": ".engines.trt_manifest",
    "CudaGraphed": ".step.cudagraph",
    "Engine": ".engines.engine",
    "EngineMismatchError": ".engines.trt_manifest",
    "ProfileError": ".engines.buffers",
    "RuntimeOptions": ".options",
    "RuntimeStats": ".telemetry.stats",
    "Step1XEditRuntime": ".runtime",
    "TorchEncoder": ".engines.torch_engine",
    "TorchEngine": ".engines.torch_engine",
    "check_compatible": ".engines.trt_manifest",
    "check_dims": ".engines.buffers",
    "edit_dims": ".engines.buffers",
    "engine_step_fn": ".step.engine_step",
    "plan_buffers": ".engines.buffers",
    "profile_shapes": ".engines.buffers",
    "select_profile": ".engines.buffers",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
