"""The reference edit: `EditFlow` (prepare -> MLLM (cond, uncond) -> VAE encode -> denoise -> VAE decode ->
postprocess) over the model's eager torch modules.

Every other backend is compared with `Step1XEditPipeline.edit`. It does only the maths of the
published model; speed belongs to `step1x_export.runtime`, which runs the same flow over its engines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from ..timing import StageTimer
from .configs import ModelConfig, get_config
from .dit.model import Step1XEdit
from .dit.step import torch_dit_step
from .edit_inputs import (  # noqa: F401  (the edit's shared inputs, importable from the pipeline as before)
    T2I_MLLM_SIZE,
    T2I_NEGATIVE_PROMPT,
    EditImage,
    EditInputs,
    make_noise,
    negative_prompt_for,
    no_reference,
    sampling_inputs,
    t2i_canvas,
)
from .flow import EditFlow
from .mllm.conditioner import Qwen25VLEmbedder
from .mllm.conditioning_cache import SHIPPED_CONDITIONING_DIR, ConditioningCache
from .sampling import ProgressFn, StepFn, denoise, guided_euler, pack, unpack
from .vae.autoencoder import AutoEncoder
from .versions import edit_version
from .versions.v1x import postprocess, prepare_image, prepare_input  # noqa: F401  (v1.0 / v1.1's, as before)
from .weights.diffusers_layout import (
    PROCESSOR_DIR,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VAE_DIR,
    dit_keymap,
    vae_keymap,
    write_model_index,
    write_weights,
)
from .weights.loading import (
    DIT_FILES,
    QWEN_DIR,
    VAE_FILE,
    Layout,
    ModelFiles,
    check_qwen_dir,
    detect_version,
    load_dit,
    load_vae,
)
from .weights.lora import LoraSpec, merge_loras
from .weights.random_weights import randomize_


def torch_step_fn(model: Step1XEdit, inputs: EditInputs, dtype: torch.dtype) -> StepFn:
    """The DiT as a denoising-step callable over this edit's conditioning: (img [2, 2N, 64], t [2]) -> pred
    float32 (as the version runs it: v1.2 once per CFG branch)."""
    step, conditioning = inputs.step_over(torch_dit_step(model, dtype)), inputs.conditioning
    return lambda img, t: step(img, t, *conditioning)


class EagerStages:
    """The pipeline's modules as the edit flow's stages: eager torch, each call timed on the pipeline's timer.
    `sample_posterior` draws the reference latent from the VAE posterior (seeded from `seed + 1`) instead of
    taking its mean."""

    def __init__(self, pipe: Step1XEditPipeline, *, seed: int = 0, sample_posterior: bool = False):
        self.pipe, self.seed, self.sample_posterior = pipe, seed, sample_posterior

    def encode_text(self, texts: list[str], image: Image.Image):
        with self.pipe.timer.stage("mllm"), torch.inference_mode():
            return self.pipe.encode(texts, image)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.pipe.timer.stage("vae_encode"), torch.inference_mode():
            gen = torch.Generator().manual_seed(self.seed + 1) if self.sample_posterior else None
            return pack(self.pipe.ae.encode(pixels, sample=self.sample_posterior, generator=gen).float())

    def denoise(self, inputs: EditInputs, *, guidance: float, truncate: float,
                progress: ProgressFn | None) -> torch.Tensor:
        step = torch_step_fn(self.pipe.model, inputs, self.pipe.dtype)
        with self.pipe.timer.stage("denoise"):
            return denoise(guided_euler(step), inputs.noise, inputs.ref, inputs.timesteps, guidance=guidance,
                           truncate=truncate, progress=progress)

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        with self.pipe.timer.stage("vae_decode"), torch.inference_mode():
            return self.pipe.ae.decode(unpack(tokens, height, width))


class Step1XEditPipeline:
    def __init__(
        self,
        config: ModelConfig,
        model: Step1XEdit,
        ae: AutoEncoder,
        embedder: Qwen25VLEmbedder | Callable[[], Qwen25VLEmbedder],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        conditioning_cache: ConditioningCache | None = None,
    ):
        """`embedder` may be a function that loads it: then the MLLM is loaded when first needed (never, when
        every edit's conditioning is in `conditioning_cache`)."""
        self.model, self.ae = model, ae
        self.config = config
        self._embedder = embedder
        self.conditioning_cache = conditioning_cache
        self.conditioning_entry: Path | None = None  # the cache entry the last edit's MLLM conditioning came from
        self.device, self.dtype = torch.device(device), dtype
        self.timer = StageTimer(self.device)

    @property
    def conditioning_from_cache(self) -> bool:
        return self.conditioning_entry is not None

    @property
    def embedder(self) -> Qwen25VLEmbedder:
        if not isinstance(self._embedder, torch.nn.Module):
            self._embedder = self._embedder()
        return self._embedder

    @property
    def config(self) -> ModelConfig:
        return self.flow.config

    @config.setter
    def config(self, config: ModelConfig) -> None:
        self.flow = EditFlow(config)  # the version's rules follow the config

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        version: str | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        config: ModelConfig | None = None,
        loras: Sequence[LoraSpec] = (),
    ) -> Step1XEditPipeline:
        """Load a model folder in the official or the diffusers layout (told apart by its files): DiT+connector
        (bf16 or FP8-stored), VAE (fp32), Qwen2.5-VL; `loras` are merged into the DiT's weights in order.

        `version` (a config name) defaults to what a diffusers folder says it holds, else v1.1; `config`
        overrides the architecture, e.g. a tiny model saved in either layout.
        """
        config = config or get_config(version or detect_version(model_dir) or "v1.1")
        files = ModelFiles.in_dir(model_dir, config.version)
        model = load_dit(files, config, dtype=dtype, device=device)
        merge_loras(model, loras)
        ae = load_vae(files, config, device=device)
        if config.tiny_qwen is None and config.embedder.hidden_size != 3584:
            raise ValueError(f"config {config.name}: full-size models read Qwen2.5-VL-7B (hidden 3584)")

        def load_embedder() -> Qwen25VLEmbedder:
            embedder = Qwen25VLEmbedder.from_pretrained(files.qwen, config.embedder, dtype=dtype, device=device,
                                                        processor_dir=files.processor)
            return edit_version(config).embedder(embedder)

        check_qwen_dir(files.qwen)  # a broken folder is refused at load, not at the first edit
        shipped = Path(model_dir) / SHIPPED_CONDITIONING_DIR
        cache = ConditioningCache.for_mllm(files.mllm_folders, config.embedder, dtype, torch.device(device),
                                           shipped if shipped.is_dir() else None)
        return cls(config, model, ae, load_embedder, device=device, dtype=dtype, conditioning_cache=cache)

    @classmethod
    def random(
        cls, config_name: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
        loras: Sequence[LoraSpec] = (),
    ) -> Step1XEditPipeline:
        """A tiny model with seeded random weights, on CPU (demo and tests); `loras` merged into its DiT."""
        config = get_config(config_name)
        if config.tiny_qwen is None:
            raise ValueError(f"config {config_name!r} is full size: random weights are only built for tiny configs")
        model = randomize_(Step1XEdit(config), seed).to(dtype).eval().requires_grad_(False)
        merge_loras(model, loras)
        ae = randomize_(AutoEncoder(config.vae), seed + 1).eval().requires_grad_(False)
        embedder = Qwen25VLEmbedder.tiny(config.tiny_qwen, params=config.embedder, seed=seed + 2, dtype=dtype)
        return cls(config, model, ae, edit_version(config).embedder(embedder), dtype=dtype)

    def save_pretrained(self, model_dir: str | Path, layout: Layout = "official", *, shards: int = 2) -> ModelFiles:
        """Write this pipeline's weights in the official or the diffusers layout (both read by `from_pretrained`);
        the diffusers transformer is written in `shards` files with an index, as published."""
        root = Path(model_dir)
        root.mkdir(parents=True, exist_ok=True)
        if layout == "diffusers":
            return self._save_diffusers(root, shards)
        files = ModelFiles(root / DIT_FILES[self.config.version][0], root / VAE_FILE, root / QWEN_DIR)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(files.dit))
        save_file({k: v.contiguous() for k, v in self.ae.state_dict().items()}, str(files.vae))
        self.embedder.model.save_pretrained(files.qwen)
        self.embedder.processor.save_pretrained(files.qwen)
        return files

    def _save_diffusers(self, root: Path, shards: int) -> ModelFiles:
        c = self.config
        write_model_index(root, c.version)  # first: refuses a version with no diffusers layout (v1.0)
        write_weights(root / TRANSFORMER_DIR, dit_keymap(c.dit.hidden_size, c.version).to_diffusers(
            self.model.state_dict()), shards)
        write_weights(root / VAE_DIR, vae_keymap(len(c.vae.ch_mult)).to_diffusers(self.ae.state_dict()))
        self.embedder.model.save_pretrained(root / TEXT_ENCODER_DIR)
        self.embedder.processor.save_pretrained(root / PROCESSOR_DIR)
        return ModelFiles.in_dir(root, c.version)

    # -- the edit -------------------------------------------------------------------------------
    def prepare(
        self,
        image: Image.Image | None,
        instruction: str,
        *,
        seed: int,
        steps: int,
        size_level: int,
        negative_prompt: str | None = None,
        sample_posterior: bool = False,
        width: int | None = None,
        height: int | None = None,
    ) -> EditInputs:
        """Everything before the denoising loop: resize, MLLM cond+uncond, reference latent, noise, RoPE.

        Without an image this is text-to-image at `width` x `height`: the MLLM sees a blank image and there
        are no reference tokens.
        """
        stages = EagerStages(self, seed=seed, sample_posterior=sample_posterior)
        _, inputs = self.flow.prepare_inputs(stages, self.timer, image, instruction, seed=seed, steps=steps,
                                             size_level=size_level, device=self.device,
                                             negative_prompt=negative_prompt, width=width, height=height)
        return inputs

    def encode(self, texts: list[str], image: Image.Image):
        """The MLLM's conditioning of `texts` on `image`, from the conditioning cache when it has it."""
        cache = self.conditioning_cache
        found = cache.lookup(texts, image) if cache is not None else None
        self.conditioning_entry = None if found is None else found[1]
        if found is not None:
            return tuple(t.to(self.device) for t in found[0])
        encoded = self.embedder(texts, image)
        if cache is not None:
            cache.store(texts, image, encoded)
        return encoded

    def decode(self, latent_tokens: torch.Tensor, inputs: EditInputs) -> Image.Image:
        return self.flow.finish(EagerStages(self), self.timer, latent_tokens, inputs.height, inputs.width,
                                inputs.orig_size)

    def edit(
        self,
        image: Image.Image | None,
        instruction: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        cfg: float | None = None,
        size_level: int | None = None,
        negative_prompt: str | None = None,
        sample_posterior: bool = False,
        progress: ProgressFn | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> Image.Image:
        """Edit `image` as `instruction` says; returns an image of the input's size. With `image=None`,
        generate a `width` x `height` image from the text (upstream's text-to-image mode).

        `size_level` defaults to the model's (1024 real, the profile's top for a tiny config). Other engines
        run the same flow through `runtime.Step1XEditRuntime`.
        `steps` defaults to the model's (28; v1.2: 50), `cfg` to its guidance (`ModelConfig.default_cfg`).
        """
        self.timer = StageTimer(self.device)
        stages = EagerStages(self, seed=seed, sample_posterior=sample_posterior)
        return self.flow.run(stages, self.timer, image, instruction, device=self.device, seed=seed, steps=steps,
                             cfg=cfg, size_level=size_level, negative_prompt=negative_prompt, progress=progress,
                             width=width, height=height)
