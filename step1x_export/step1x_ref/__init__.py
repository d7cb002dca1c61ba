"""The reference model: exactly the published maths, what every other backend is compared with.

    from step1x_export.step1x_ref import Step1XEditPipeline
    pipe = Step1XEditPipeline.random("tiny")

Grouped by what it models: `dit/` (the DiT and the connector), `vae/`, `mllm/` (the conditioners and their
processor), `weights/` (layouts, loading, LoRA), `versions/` (what differs between releases); the edit's own
steps (`imaging`, `sampling`, `pipeline`) and the configs sit here.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AutoEncoder": ".vae.autoencoder",
    "ModelConfig": ".configs",
    "Qwen25VLEmbedder": ".mllm.conditioner",
    "Step1XEdit": ".dit.model",
    "Step1XEditPipeline": ".pipeline",
    "get_config": ".configs",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
