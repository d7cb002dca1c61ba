"""The reference edit: preprocess -> MLLM (cond, uncond) -> VAE encode -> denoise -> VAE decode.

Every other backend is compared with `Step1XEditPipeline.edit`. It does only the maths of the
published model; speed belongs to `step1x_export.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from ..specs import profile_for
from ..timing import StageTimer
from ..validate import check_edit_numbers, check_finite
from .autoencoder import AutoEncoder
from .conditioner import Qwen25VLEmbedder
from .configs import ModelConfig, get_config
from .edit_v1p2 import branch_conditioning, per_branch, postprocess_v1p2, prepare_image_v1p2, torch_dit_step, with_rules
from .imaging import check_size, edit_size, pil_to_tensor, tensor_to_pil, to_rgb
from .loading import DIT_FILES, QWEN_DIR, VAE_FILE, ModelFiles, load_into
from .math import rope_table
from .model import Step1XEdit
from .random_weights import randomize_
from .sampling import ProgressFn, StepFn, denoise, get_schedule, guided_euler, pack, position_ids, unpack


@dataclass
class EditInputs:
    """What the denoising loop needs, prepared once per edit (shared by every backend)."""

    noise: torch.Tensor  # [1, N, 64] packed, float32
    ref: torch.Tensor  # [1, N, 64] packed reference latent, float32
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
    """The input image at the edit resolution, as the VAE and the MLLM receive it."""

    resized: torch.Tensor  # [1, 3, H, W] in [0, 1]
    mllm_image: Image.Image
    width: int
    height: int
    orig_size: tuple[int, int]


def prepare_image(image: Image.Image, size_level: int, size: tuple[int, int] | None = None) -> EditImage:
    """Validate, convert to RGB and resize by the size_level rule (shared by every backend), or to `size`
    (width, height: a shape bucket) when given."""
    check_size(image)
    image = to_rgb(image)
    width, height = size or edit_size(*image.size, size_level)
    resized = pil_to_tensor(image.resize((width, height), Image.Resampling.BICUBIC))
    # Upstream hands the MLLM the resized image after a float round trip (to_pil truncates).
    return EditImage(resized, tensor_to_pil(resized[0]), width, height, image.size)


def sampling_inputs(
    config: ModelConfig, txt_len: int, width: int, height: int, *, seed: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(packed noise [1, N, 64], RoPE table pe, timesteps) of one edit, on CPU."""
    n_h, n_w = height // 16, width // 16
    ids = position_ids(txt_len, n_h, n_w, config.version)
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
        embedder: Qwen25VLEmbedder,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.config, self.model, self.ae, self.embedder = config, model, ae, embedder
        self.device, self.dtype = torch.device(device), dtype
        self.timer = StageTimer(self.device)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        version: str = "v1.1",
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        config: ModelConfig | None = None,
    ) -> Step1XEditPipeline:
        """Load the official files: DiT+connector (bf16 or FP8-stored), vae.safetensors (fp32), Qwen dir.

        `config` overrides the architecture (default: the named `version`'s), e.g. a tiny model saved
        in the official layout.
        """
        config = config or get_config(version)
        files = ModelFiles.in_dir(model_dir, config.version)
        model = load_into(lambda: Step1XEdit(config), files.dit, dtype=dtype, device=device)
        ae = load_into(lambda: AutoEncoder(config.vae), files.vae, dtype=torch.float32, device=device)
        if config.tiny_qwen is None and config.embedder.hidden_size != 3584:
            raise ValueError(f"config {config.name}: full-size models read Qwen2.5-VL-7B (hidden 3584)")
        embedder = Qwen25VLEmbedder.from_pretrained(files.qwen, config.embedder, dtype=dtype, device=device)
        return cls(config, model, ae, with_rules(embedder, config), device=device, dtype=dtype)

    @classmethod
    def random(
        cls, config_name: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> Step1XEditPipeline:
        """A tiny model with seeded random weights, on CPU (demo and tests)."""
        config = get_config(config_name)
        if config.tiny_qwen is None:
            raise ValueError(f"config {config_name!r} is full size: random weights are only built for tiny configs")
        model = randomize_(Step1XEdit(config), seed).to(dtype).eval().requires_grad_(False)
        ae = randomize_(AutoEncoder(config.vae), seed + 1).eval().requires_grad_(False)
        embedder = Qwen25VLEmbedder.tiny(config.tiny_qwen, params=config.embedder, seed=seed + 2, dtype=dtype)
        return cls(config, model, ae, with_rules(embedder, config), dtype=dtype)

    def save_pretrained(self, model_dir: str | Path) -> ModelFiles:
        """Write this pipeline's weights in the official layout (what `from_pretrained` reads)."""
        root = Path(model_dir)
        root.mkdir(parents=True, exist_ok=True)
        files = ModelFiles(root / DIT_FILES[self.config.version][0], root / VAE_FILE, root / QWEN_DIR)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(files.dit))
        save_file({k: v.contiguous() for k, v in self.ae.state_dict().items()}, str(files.vae))
        self.embedder.model.save_pretrained(files.qwen)
        self.embedder.processor.save_pretrained(files.qwen)
        return files

    # -- stages ---------------------------------------------------------------------------------
    def prepare(
        self,
        image: Image.Image,
        instruction: str,
        *,
        seed: int,
        steps: int,
        size_level: int,
        negative_prompt: str = "",
        sample_posterior: bool = False,
    ) -> EditInputs:
        """Everything before the denoising loop: resize, MLLM cond+uncond, reference latent, noise, RoPE."""
        v12 = self.config.reason_edit is not None
        with self.timer.stage("preprocess"):
            img = EditImage(*prepare_image_v1p2(image, size_level)) if v12 else prepare_image(image, size_level)
        with self.timer.stage("mllm"), torch.inference_mode():
            encoded = self.embedder([instruction, negative_prompt], img.mllm_image)
        branches = branch_conditioning(self.config, encoded, img.width, img.height) if v12 else None
        emb, mask = branches[1:3] if branches else encoded
        with self.timer.stage("vae_encode"), torch.inference_mode():
            gen = torch.Generator().manual_seed(seed + 1) if sample_posterior else None
            ref_latent = self.ae.encode(img.resized.to(self.device) * 2 - 1, sample=sample_posterior, generator=gen)
        noise, pe, timesteps = sampling_inputs(self.config, emb.shape[1], img.width, img.height, seed=seed, steps=steps)
        pe = branches[0] if branches else pe
        return EditInputs(
            noise=noise.to(self.device),
            ref=pack(ref_latent.float()),
            llm_embedding=emb.to(self.device),
            llm_mask=mask.to(self.device),
            pe=pe.to(self.device),
            timesteps=timesteps,
            width=img.width,
            height=img.height,
            orig_size=img.orig_size,
            branches=branches,
        )

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
        image: Image.Image,
        instruction: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        cfg: float = 6.0,
        size_level: int | None = None,
        negative_prompt: str = "",
        sample_posterior: bool = False,
        progress: ProgressFn | None = None,
    ) -> Image.Image:
        """Edit `image` as `instruction` says; returns an image of the input's size.

        `size_level` defaults to the model's (1024 real, the profile's top for a tiny config). Other engines
        run the same loop through `runtime.Step1XEditRuntime`.
        `steps` defaults to the model's (28; v1.2: 50).
        """
        steps = self.config.default_steps if steps is None else steps
        size_level = profile_for(self.config).max_level if size_level is None else size_level
        check_edit_numbers(steps=steps, cfg=cfg, size_level=size_level, seed=seed)
        self.timer = StageTimer(self.device)
        inputs = self.prepare(
            image, instruction, seed=seed, steps=steps, size_level=size_level,
            negative_prompt=negative_prompt, sample_posterior=sample_posterior,
        )
        step = torch_step_fn(self.model, inputs, self.dtype)
        with self.timer.stage("denoise"):
            latent = denoise(
                guided_euler(step), inputs.noise, inputs.ref, inputs.timesteps,
                guidance=cfg, truncate=self.config.cfg_truncate, progress=progress,
            )
        return self.decode(latent, inputs)

