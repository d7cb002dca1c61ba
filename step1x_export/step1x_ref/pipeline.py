"""The reference edit: preprocess -> MLLM (cond, uncond) -> VAE encode -> denoise -> VAE decode.

Every other backend is compared with `Step1XEditPipeline.edit`. It does only the maths of the
published model; speed belongs to `step1x_export.runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from ..timing import StageTimer
from ..validate import check_edit_numbers, check_finite
from .autoencoder import AutoEncoder
from .conditioner import Qwen25VLEmbedder
from .conditioning_cache import ConditioningCache
from .configs import ModelConfig, Resample, get_config
from .diffusers_layout import (
    PROCESSOR_DIR,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VAE_DIR,
    dit_keymap,
    vae_keymap,
    write_model_index,
    write_weights,
)
from .edit_v1p2 import branch_conditioning, per_branch, postprocess_v1p2, prepare_image_v1p2, torch_dit_step, with_rules
from .imaging import RESAMPLE, check_size, edit_size, pil_to_tensor, tensor_to_pil, to_rgb
from .loading import (
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
from .lora import LoraSpec, merge_loras
from .math import rope_table
from .model import Step1XEdit
from .profiles import profile_for
from .random_weights import randomize_
from .sampling import ProgressFn, StepFn, denoise, get_schedule, guided_euler, pack, position_ids, unpack


@dataclass
class EditInputs:
    """What the denoising loop needs, prepared once per edit (shared by every backend)."""

    noise: torch.Tensor  # [1, N, 64] packed, float32
    ref: torch.Tensor  # [1, N, 64] packed reference latent, float32 ([1, 0, 64] for text-to-image)
    llm_embedding: torch.Tensor  # [2, L, C] (cond, uncond)
    llm_mask: torch.Tensor  # [2, L]
    pe: torch.Tensor  # [1, 1, L + 2N, D/2, 2, 2]
    timesteps: list[float]
    width: int  # edit resolution (multiples of 16)
    height: int
    orig_size: tuple[int, int]
    # v1.2: both CFG branches' DiT inputs (their text lengths differ); llm_embedding, llm_mask and pe
    # then hold the cond branch's. None before v1.2 (one batch of 2 over the fields above).
    branches: tuple[torch.Tensor, ...] | None = None


@dataclass
class EditImage:
    """The input image at the edit resolution, as the VAE and the MLLM receive it (text-to-image: no
    reference image, `resized` is None and the MLLM sees a blank canvas)."""

    resized: torch.Tensor | None  # [1, 3, H, W] in [0, 1]
    mllm_image: Image.Image
    width: int
    height: int
    orig_size: tuple[int, int]

    @property
    def has_reference(self) -> bool:
        return self.resized is not None



# Text-to-image, as upstream's inference.py runs it: the MLLM reads a black 1024x1024 image, and the CLI's
# unconditional branch gets this negative prompt (an edit's gets "").
T2I_MLLM_SIZE = (1024, 1024)
T2I_NEGATIVE_PROMPT = (
    "worst quality, wrong limbs, unreasonable limbs, normal quality, low quality, low res, blurry, text, "
    "watermark, logo, banner, extra digits, cropped, jpeg artifacts, signature, username, error, sketch ,"
    "duplicate, ugly, monochrome, horror, geometry, mutation, disgusting"
)


def prepare_image(image: Image.Image, size_level: int, size: tuple[int, int] | None = None,
                  resample: Resample = "lanczos") -> EditImage:
    """Validate, convert to RGB and resize by the size_level rule (shared by every backend), or to `size`
    (width, height: a shape bucket) when given, with the config's filter."""
    check_size(image)
    image = to_rgb(image)
    width, height = size or edit_size(*image.size, size_level)
    resized = pil_to_tensor(image.resize((width, height), RESAMPLE[resample]))
    # Upstream hands the MLLM the resized image after a float round trip (to_pil truncates).
    return EditImage(resized, tensor_to_pil(resized[0]), width, height, image.size)


def t2i_canvas(width: int, height: int) -> EditImage:
    """Text-to-image at width x height (multiples of 16): no reference, a blank image for the MLLM."""
    for name, side in (("width", width), ("height", height)):
        if side < 16 or side % 16:
            raise ValueError(f"text-to-image {name} must be a multiple of 16 and >= 16, got {side}")
    return EditImage(None, Image.new("RGB", T2I_MLLM_SIZE), width, height, (width, height))


def prepare_input(image: Image.Image | None, size_level: int, config: ModelConfig,
                  width: int | None = None, height: int | None = None,
                  bucket: tuple[int, int] | None = None) -> EditImage:
    """The edit's image (resized with the config's filter), or the text-to-image canvas when there is none."""
    if image is None:
        if width is None or height is None:
            raise ValueError("text-to-image (no input image) needs width and height")
        return t2i_canvas(width, height)
    if width is not None or height is not None:
        raise ValueError("width/height choose a text-to-image size; an edit's size follows its image and size_level")
    return prepare_image(image, size_level, bucket, config.input_resample)


def no_reference(config: ModelConfig, device: torch.device | str) -> torch.Tensor:
    """The reference tokens of a text-to-image run: none ([1, 0, 64]); the loop's concat then adds nothing."""
    return torch.zeros(1, 0, config.dit.in_channels, device=device)


def negative_prompt_for(img: EditImage, negative_prompt: str | None) -> str:
    """The unconditional branch's prompt: as given, else upstream's default for the task."""
    if negative_prompt is not None:
        return negative_prompt
    return "" if img.has_reference else T2I_NEGATIVE_PROMPT


def sampling_inputs(
    config: ModelConfig, txt_len: int, width: int, height: int, *, seed: int, steps: int, reference: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(packed noise [1, N, 64], RoPE table pe, timesteps) of one edit (or, without reference, one
    text-to-image generation), on CPU."""
    n_h, n_w = height // 16, width // 16
    ids = position_ids(txt_len, n_h, n_w, config.version, reference=reference)
    pe = rope_table(ids, config.dit.axes_dim, config.dit.theta)
    return pack(make_noise(width, height, seed)), pe, get_schedule(steps, n_h * n_w)


def postprocess(pixels: torch.Tensor, orig_size: tuple[int, int]) -> Image.Image:
    """Decoded pixels [1, 3, H, W] in about [-1, 1] -> PIL at the input's size."""
    out = tensor_to_pil(pixels[0].float().clamp(-1, 1).mul(0.5).add(0.5))
    return out.resize(orig_size, Image.Resampling.BICUBIC)


def make_noise(width: int, height: int, seed: int) -> torch.Tensor:
    """Seeded N(0, 1) latent noise [1, 16, H/8, W/8] from a CPU generator (device-independent)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, height // 8, width // 8, generator=gen, dtype=torch.float32)


def torch_step_fn(model: Step1XEdit, inputs: EditInputs, dtype: torch.dtype) -> StepFn:
    """The DiT as a denoising-step callable: (img [2, 2N, 64], t [2]) -> pred float32."""
    if inputs.branches is not None:
        branch_step, branches = per_branch(torch_dit_step(model, dtype)), inputs.branches
        return lambda img, t: branch_step(img, t, *branches)
    emb, mask, pe = inputs.llm_embedding.to(dtype), inputs.llm_mask, inputs.pe

    @torch.inference_mode()
    def step(img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(img.to(dtype), pe, t.to(dtype), emb, mask).float()

    return step


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
        self.config, self.model, self.ae = config, model, ae
        self._embedder = embedder
        self.conditioning_cache = conditioning_cache
        self.conditioning_from_cache = False  # whether the last edit's MLLM conditioning came from the cache
        self.device, self.dtype = torch.device(device), dtype
        self.timer = StageTimer(self.device)

    @property
    def embedder(self) -> Qwen25VLEmbedder:
        if not isinstance(self._embedder, torch.nn.Module):
            self._embedder = self._embedder()
        return self._embedder

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
            return with_rules(embedder, config)

        check_qwen_dir(files.qwen)  # a broken folder is refused at load, not at the first edit
        cache = ConditioningCache.for_mllm([files.qwen, files.processor or files.qwen], config.embedder, dtype,
                                           torch.device(device))
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
        return cls(config, model, ae, with_rules(embedder, config), dtype=dtype)

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

    # -- stages ---------------------------------------------------------------------------------
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
        v12 = self.config.reason_edit is not None
        if v12 and image is None:
            raise ValueError(f"{self.config.name}: text-to-image is not supported for v1.2")
        with self.timer.stage("preprocess"):
            img = (EditImage(*prepare_image_v1p2(image, size_level)) if v12
                   else prepare_input(image, size_level, self.config, width, height))
        with self.timer.stage("mllm"), torch.inference_mode():
            encoded = self.encode([instruction, negative_prompt_for(img, negative_prompt)], img.mllm_image)
        branches = branch_conditioning(self.config, encoded, img.width, img.height) if v12 else None
        emb, mask = branches[1:3] if branches else encoded
        with self.timer.stage("vae_encode"), torch.inference_mode():
            ref = no_reference(self.config, self.device)
            if img.resized is not None:
                gen = torch.Generator().manual_seed(seed + 1) if sample_posterior else None
                latent = self.ae.encode(img.resized.to(self.device) * 2 - 1, sample=sample_posterior, generator=gen)
                ref = pack(latent.float())
        noise, pe, timesteps = sampling_inputs(self.config, emb.shape[1], img.width, img.height, seed=seed,
                                               steps=steps, reference=img.has_reference)
        pe = branches[0] if branches else pe
        return EditInputs(
            noise=noise.to(self.device),
            ref=ref,
            llm_embedding=emb.to(self.device),
            llm_mask=mask.to(self.device),
            pe=pe.to(self.device),
            timesteps=timesteps,
            width=img.width,
            height=img.height,
            orig_size=img.orig_size,
            branches=branches,
        )

    def encode(self, texts: list[str], image: Image.Image):
        """The MLLM's conditioning of `texts` on `image`, from the conditioning cache when it has it."""
        cache = self.conditioning_cache
        stored = cache.load(texts, image) if cache is not None else None
        self.conditioning_from_cache = stored is not None
        if stored is not None:
            return tuple(t.to(self.device) for t in stored)
        encoded = self.embedder(texts, image)
        if cache is not None:
            cache.store(texts, image, encoded)
        return encoded

    def decode(self, latent_tokens: torch.Tensor, inputs: EditInputs) -> Image.Image:
        check_finite("denoising (final latent)", latent_tokens)
        with self.timer.stage("vae_decode"), torch.inference_mode():
            pixels = self.ae.decode(unpack(latent_tokens.float(), inputs.height, inputs.width))
            check_finite("the VAE decoder (image)", pixels)
        with self.timer.stage("postprocess"):
            finish = postprocess_v1p2 if self.config.reason_edit is not None else postprocess
            return finish(pixels, inputs.orig_size)

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
        run the same loop through `runtime.Step1XEditRuntime`.
        `steps` defaults to the model's (28; v1.2: 50), `cfg` to its guidance (`ModelConfig.default_cfg`).
        """
        steps = self.config.default_steps if steps is None else steps
        cfg = self.config.default_cfg if cfg is None else cfg
        size_level = profile_for(self.config).max_level if size_level is None else size_level
        check_edit_numbers(steps=steps, cfg=cfg, size_level=size_level, seed=seed)
        self.timer = StageTimer(self.device)
        inputs = self.prepare(
            image, instruction, seed=seed, steps=steps, size_level=size_level,
            negative_prompt=negative_prompt, sample_posterior=sample_posterior, width=width, height=height,
        )
        step = torch_step_fn(self.model, inputs, self.dtype)
        with self.timer.stage("denoise"):
            latent = denoise(
                guided_euler(step), inputs.noise, inputs.ref, inputs.timesteps,
                guidance=cfg, truncate=self.config.cfg_truncate, progress=progress,
            )
        return self.decode(latent, inputs)

