"""Engines: one protocol (named tensors in, named tensors out, per a component's I/O spec) and its backends.

`engine.Engine` is the protocol; `torch_engine` wraps PyTorch modules (with `compile` for the DiT's blocks and
`mllm` for the MLLM's memory), `onnxruntime` exported graphs, `trt_build` / `trt_engine` / `trt_manifest`
TensorRT engines; `buffers` holds the static shapes every backend's profiles are checked against.
"""
