"""A TensorRT engine as an Engine: deserialise, pick the optimization profile for the shapes, bind
static buffers from the shared pool, and `execute_async_v3` on the current torch CUDA stream.

Everything is stream-ordered with no host sync, so a call can be captured inside a CUDA graph
(`cudagraph.CudaGraphed`): the warm-up call does TensorRT's deferred set-up before capture.
Requires the optional `tensorrt` extra and a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ...specs import ComponentSpec
from .buffers import BufferPool, ProfileShapes, Shape, select_profile


def torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}
    if trt_dtype not in table:
        raise TypeError(f"TensorRT I/O dtype {trt_dtype} has no torch equivalent here")
    return table[trt_dtype]


class TensorRTEngine:
    def __init__(self, path: str | Path, spec: ComponentSpec, profiles: list[ProfileShapes], pool: BufferPool):
        import tensorrt as trt

        self.spec, self.profiles, self.pool, self.path = spec, profiles, pool, Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{spec.name}: TensorRT engine {self.path} does not exist")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{spec.name}: TensorRT could not deserialise {self.path} (see its log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = spec.input_names + spec.output_names
        if sorted(names) != sorted(expected):
            raise ValueError(f"{spec.name}: engine {self.path} has I/O {names}, the spec says {expected}")
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self._profile: int | None = None
        self._shapes: dict[str, Shape] = {}
        self._buffers: dict[str, Tensor] = {}

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        """Outputs are the engine's static buffers: read (or copy) them before the next call overwrites them."""
        if self.context is None:
            raise RuntimeError(f"{self.spec.name}: engine is closed")
        self.spec.check_inputs(inputs)
        stream = torch.cuda.current_stream().cuda_stream
        shapes = {n: tuple(inputs[n].shape) for n in self.spec.input_names}
        if shapes != self._shapes:  # shape changes are host-side set-up; steady-state calls skip them
            self._bind(shapes, stream)
        for name in self.spec.input_names:  # copy into the static buffers TensorRT reads (stream-ordered)
            self._buffers[name].copy_(inputs[name])
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT execute_async_v3 failed")
        return {n: self._buffers[n] for n in self.spec.output_names}

    def _bind(self, shapes: dict[str, Shape], stream: int) -> None:
        profile = select_profile(self.spec.name, shapes, self.profiles)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream)
            self._profile = profile
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.spec.name}: TensorRT refused shape {shape} for input {name}")
        self._buffers = {}
        for name in self.spec.input_names + self.spec.output_names:
            shape = shapes[name] if name in shapes else tuple(self.context.get_tensor_shape(name))
            buf = self.pool.get(f"{self.spec.name}.{name}", shape, self.dtypes[name])
            self.context.set_tensor_address(name, buf.data_ptr())
            self._buffers[name] = buf
        self._shapes = shapes

    def close(self) -> None:
        # Context before engine before runtime: TensorRT's destruction order.
        self.context = None
        self.engine = None
        self._runtime = None
        self._buffers = {}
