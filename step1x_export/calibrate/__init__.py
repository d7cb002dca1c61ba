"""Calibration and W8A8 quantization (FP8 E4M3, INT8 SmoothQuant): data -> stats -> artifact -> transform.

- `dataset`: scikit-image photographs x GEdit-Bench-style instructions (EN + ZH), with a held-out split;
- `collect`: per-Linear input amax over the reference sampling loop;
- `recipes`: stats -> scales (`build_artifact`), layer selection by name patterns;
- `artifact`: the versioned file (`save_artifact` / `load_artifact`);
- `apply`: `quantize_model` (torch, `QuantLinear` from `qlinear`); `onnx_qdq`: `insert_qdq` (ONNX Q/DQ);
- `evaluate`: SQNR per step and image PSNR against the reference;
- `weight_only`: 8-bit weight-only Linears (modulation, connector, the MLLM);
- `qcheckpoint`: the quantized DiT as one safetensors file, streamed from the source checkpoint.
"""
