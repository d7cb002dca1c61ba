"""ONNX Runtime backend: an `Engine` per exported graph, and the MLLM from the vision + llm graphs.

`OrtEngine` binds torch tensors to the session by pointer (I/O binding) on every provider, so CUDA
inputs never leave the GPU and bf16 needs no numpy dtype; outputs come back as torch tensors through
DLPack. (ORT's CPU provider has few bf16 kernels: run bf16 graphs with the CUDA provider, fp32 on CPU.)

A whole edit from an export folder is `Step1XEditRuntime.load(dir, backend="onnxruntime")`: the same
preprocessing, denoising loop and postprocessing as every backend, so torch and ORT edits differ only in
the graphs.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import torch
from PIL import Image
from torch import Tensor

from ...export.components import pad_batch
from ...export.export import QWEN_DIR
from ...export.manifest import ComponentEntry, ExportError, Manifest
from ...export.qwen import llm_position_ids, vision_inputs
from ...specs import ComponentSpec
from ...step1x_ref.configs import EmbedderParams, ModelConfig
from ...step1x_ref.mllm.conditioner import build_mllm_inputs, select_tokens

_ONNX_TYPES = {
    "tensor(float)": (1, torch.float32),
    "tensor(float16)": (10, torch.float16),
    "tensor(bfloat16)": (16, torch.bfloat16),
    "tensor(int64)": (7, torch.int64),
    "tensor(int32)": (6, torch.int32),
    "tensor(bool)": (9, torch.bool),
}


def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are present, else CPU."""
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtEngine:
    """One ONNX graph as an `Engine`: `engine(**inputs) -> {output name: tensor}`, names from `spec`."""

    def __init__(
        self,
        path: str | Path,
        spec: ComponentSpec,
        *,
        providers: list[str] | None = None,
        entry: ComponentEntry | None = None,
        session_options: ort.SessionOptions | None = None,
    ):
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{spec.name}: graph {path} does not exist")
        self.spec, self.entry, self.path = spec, entry, path
        options = session_options or ort.SessionOptions()
        self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
        got = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if got != (spec.input_names, spec.output_names):
            raise ExportError(f"{spec.name}: {path} has inputs/outputs {got}, the spec declares "
                              f"{spec.input_names} -> {spec.output_names}")
        self._types = {i.name: _ONNX_TYPES[i.type] for i in self.session.get_inputs()}
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        if not self.on_cuda and any(dtype == torch.bfloat16 for _, dtype in self._types.values()):
            raise ExportError(f"{spec.name}: {path} is a bf16 graph; ONNX Runtime's CPU kernels lack bf16 (Mul, "
                              "MatMul, ...): run it with CUDAExecutionProvider (onnxruntime-gpu) or export fp32/fp16")
        # The GPU the session runs on (its provider's device_id, default 0), not torch's current device:
        # inputs bound on another GPU would be read from the wrong device.
        cuda_id = int(self.session.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))
        self.device = torch.device("cuda", cuda_id) if self.on_cuda else torch.device("cpu")

    @classmethod
    def from_manifest(cls, manifest: Manifest, name: str, *, providers: list[str] | None = None) -> OrtEngine:
        entry = manifest.component(name)
        return cls(entry.path, entry.spec, providers=providers, entry=entry)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        if self.session is None:
            raise RuntimeError(f"{self.spec.name}: engine is closed")
        if self.entry is not None:
            self.entry.check_shapes({k: tuple(v.shape) for k, v in inputs.items()})
        binding = self.session.io_binding()
        kept = []  # the bound buffers must outlive the run
        self.spec.check_inputs(inputs)
        for name in self.spec.input_names:
            onnx_type, dtype = self._types[name]
            t = inputs[name].to(self.device, dtype).contiguous()
            kept.append(t)
            binding.bind_input(name, self.device.type, self.device.index or 0, onnx_type, tuple(t.shape), t.data_ptr())
        for name in self.spec.output_names:
            binding.bind_output(name, self.device.type, self.device.index or 0)
        if self.on_cuda:  # inputs written on torch's stream of the session's GPU; ORT runs on its own stream
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        # DLPack shares ORT's buffer (no copy) on CPU and CUDA, bf16 included.
        names = self.spec.output_names
        return {n: torch.from_dlpack(v._ortvalue.to_dlpack()) for n, v in zip(names, outputs, strict=True)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


# -- the MLLM from its graphs ------------------------------------------------------------------------
class OrtEmbedder:
    """Stands in for `Qwen25VLEmbedder`: vision graph once per image, one batched LLM graph call."""

    def __init__(self, vision: OrtEngine, llm: OrtEngine, processor, qwen_config, params: EmbedderParams):
        self.vision, self.llm, self.processor = vision, llm, processor
        self.qwen_config, self.params = qwen_config, params

    def close(self) -> None:
        self.vision.close()
        self.llm.close()

    def __call__(self, instructions: list[str], image: Image.Image) -> tuple[Tensor, Tensor]:
        batch = [build_mllm_inputs(self.processor, text, image, self.params) for text in instructions]
        grid = batch[0].image_grid_thw
        host = vision_inputs(grid, self.qwen_config.vision_config)
        image_embeds = self.vision(pixel_values=batch[0].pixel_values, **host)["image_embeds"]
        ids, mask = pad_batch([b.input_ids[0] for b in batch], [b.attention_mask[0] for b in batch])
        positions = llm_position_ids(ids, mask, grid, self.qwen_config)
        hidden = self.llm(input_ids=ids, attention_mask=mask, position_ids=positions, image_embeds=image_embeds)
        hidden = hidden["last_hidden_state"].float().cpu()
        # Each row's own length: right padding sits after the tokens select_tokens keeps.
        embs, masks = zip(*(select_tokens(hidden[i : i + 1, : len(b.input_ids[0])], self.params)
                            for i, b in enumerate(batch)), strict=True)
        return torch.cat(embs), torch.cat(masks)


def ort_embedder(manifest: Manifest, config: ModelConfig, *, providers: list[str] | None = None) -> OrtEmbedder:
    """The MLLM from an export's vision + llm graphs and its saved Qwen config and processor."""
    from transformers import Qwen2_5_VLConfig

    from ...step1x_ref.mllm.qwen_processor import load_processor

    vision, llm = (OrtEngine.from_manifest(manifest, n, providers=providers) for n in ("vision", "llm"))
    qwen_dir = manifest.directory / QWEN_DIR
    processor, qwen_config = load_processor(qwen_dir, config.embedder), Qwen2_5_VLConfig.from_pretrained(qwen_dir)
    return OrtEmbedder(vision, llm, processor, qwen_config, config.embedder)

