"""Loading checkpoints: build on `meta`, strict keys, `assign=True`.

Two layouts are read, told apart by `model_index.json`: the official files (our module names are the
official ones: nothing is remapped) and the diffusers layout (`transformer/`, `vae/`, `text_encoder/`,
`processor/`; keys converted by `diffusers_layout`'s tables, checked in the file's own names first).
Errors name the file and the offending keys; a file's dtype (bf16 or float8_e4m3fn) is cast to the
dtype asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..configs import ModelConfig
from ..dit.model import Step1XEdit
from ..vae.autoencoder import AutoEncoder
from .diffusers_layout import (
    MODEL_INDEX,
    PIPELINE_VERSIONS,
    PROCESSOR_DIR,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VAE_DIR,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    KeyMap,
    KeyMapError,
    dit_keymap,
    vae_keymap,
)

DIT_FILES = {
    "v1.0": ("step1x-edit-i1258.safetensors", "step1x-edit-i1258-FP8.safetensors"),
    "v1.1": ("step1x-edit-v1p1-official.safetensors",),
    # v1.2 is published in the diffusers layout only; this official-style name is what `save_pretrained`
    # writes (keys as v1.1's plus `text_token_mapping.weight/bias`).
    "v1.2": ("step1x-edit-v1p2-official.safetensors",),
}
VAE_FILE = "vae.safetensors"
QWEN_DIR = "Qwen2.5-VL-7B-Instruct"
# In an official folder without a VAE and a Qwen folder: {"vae_and_mllm": "<folder that has them>"}.
SHARED_FILE = "shared.json"
# What a Hugging Face model folder holds its weights in (single file or sharded, safetensors or pickle).
QWEN_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model it is loaded into."""


Layout = Literal["official", "diffusers"]


@dataclass(frozen=True)
class ModelFiles:
    dit: Path  # a safetensors file, or a sharded checkpoint's index (.safetensors.index.json)
    vae: Path
    qwen: Path
    layout: Layout = "official"
    processor: Path | None = None  # the Qwen processor's folder where it is apart from the model (diffusers)

    @property
    def mllm_folders(self) -> list[Path]:
        """Every folder the MLLM is read from: its weights', and the processor's where it lives apart."""
        return [self.qwen, *([self.processor] if self.processor else [])]

    @classmethod
    def in_dir(cls, model_dir: str | Path, version: str) -> ModelFiles:
        """Find the files of `version` in `model_dir`, in either layout (a `model_index.json` marks diffusers')."""
        root = Path(model_dir)
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"model directory {root} is a file, not a folder")
        if not root.is_dir():
            raise CheckpointError(f"model directory {root} does not exist")
        if (root / MODEL_INDEX).is_file():
            return cls.in_diffusers_dir(root, version)
        names = DIT_FILES.get(version)
        if names is None:
            raise CheckpointError(f"unknown version {version!r}; known: {', '.join(DIT_FILES)}")
        dit = next((root / n for n in names if (root / n).is_file()), None)
        if dit is None:
            raise CheckpointError(f"no {version} DiT checkpoint in {root}: expected one of {', '.join(names)}")
        shared = shared_root(root)
        vae, qwen = shared / VAE_FILE, shared / QWEN_DIR
        if not vae.is_file():
            raise CheckpointError(f"missing VAE checkpoint {vae}")
        check_qwen_dir(qwen)
        return cls(dit=dit, vae=vae, qwen=qwen)

    @classmethod
    def in_diffusers_dir(cls, root: Path, version: str) -> ModelFiles:
        held = diffusers_version(root)
        if held != version:
            raise CheckpointError(f"{root} holds {held} weights (its {MODEL_INDEX}), not {version}")
        for sub in (TEXT_ENCODER_DIR, PROCESSOR_DIR):
            if not (root / sub).is_dir():
                raise CheckpointError(f"diffusers layout {root}: missing folder {sub}/")
        return cls(_weights_in(root / TRANSFORMER_DIR), _weights_in(root / VAE_DIR), root / TEXT_ENCODER_DIR,
                   "diffusers", root / PROCESSOR_DIR)


def shared_root(root: Path) -> Path:
    """Where an official folder's VAE and Qwen2.5-VL are: the folder itself, or, for a fine-tune that ships
    only its DiT + connector, the folder its `SHARED_FILE` names (a path relative to it) when it holds neither."""
    pointer = root / SHARED_FILE
    if (root / VAE_FILE).exists() or (root / QWEN_DIR).exists() or not pointer.is_file():
        return root
    try:
        other = (root / json.loads(pointer.read_text())["vae_and_mllm"]).resolve()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {pointer} (expected {{\"vae_and_mllm\": \"<folder>\"}}): {e}") from e
    if not other.is_dir():
        raise CheckpointError(f"{pointer} names {other}, which is not a folder")
    return other


def diffusers_version(root: Path) -> str:
    """The version a diffusers-layout folder holds, from its model_index.json's pipeline class."""
    path = root / MODEL_INDEX
    try:
        name = json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if name not in PIPELINE_VERSIONS:
        raise CheckpointError(f"{path}: pipeline {name!r} is not a Step1X-Edit pipeline "
                              f"(known: {', '.join(PIPELINE_VERSIONS)})")
    return PIPELINE_VERSIONS[name]


def detect_version(model_dir: str | Path) -> str | None:
    """The version a model folder says it holds (diffusers layout), or None (official files do not say)."""
    root = Path(model_dir)
    return diffusers_version(root) if (root / MODEL_INDEX).is_file() else None


def mllm_dirs(path: str | Path) -> tuple[Path, Path | None]:
    """(Qwen2.5-VL model folder, processor folder or None) of a Qwen folder, an official model folder or a
    diffusers-layout folder."""
    root = Path(path)
    if (root / MODEL_INDEX).is_file():
        return root / TEXT_ENCODER_DIR, root / PROCESSOR_DIR
    if (root / QWEN_DIR).is_dir() or (root / SHARED_FILE).is_file():
        return shared_root(root) / QWEN_DIR, None
    return root, None


def _weights_in(folder: Path) -> Path:
    for name in (WEIGHTS_INDEX, WEIGHTS_FILE):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"diffusers layout: no {WEIGHTS_INDEX} or {WEIGHTS_FILE} in {folder}")


def read_weights(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """A safetensors file or a sharded checkpoint (its index json): the tensors and the file each came from."""
    if not path.name.endswith(".index.json"):
        state = read_safetensors(path, device)
        return state, dict.fromkeys(state, path)
    try:
        weight_map: dict[str, str] = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the shard index {path}: {e}") from e
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(path.parent / shard, device)
        listed = {k for k, f in weight_map.items() if f == shard}
        if listed != tensors.keys():
            diff = sorted(listed ^ tensors.keys())
            raise CheckpointError(f"{path.parent / shard} does not hold what {path.name} lists: {', '.join(diff[:10])}")
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, path.parent / shard))
    return state, origin


def check_qwen_dir(qwen: Path) -> None:
    """A Qwen2.5-VL folder must hold config.json and its weights: checked before anything is loaded."""
    if not qwen.is_dir():
        raise CheckpointError(f"missing Qwen2.5-VL directory {qwen}")
    if not (qwen / "config.json").is_file():
        raise CheckpointError(f"{qwen} is not a Hugging Face Qwen2.5-VL directory: no config.json")
    if not any((qwen / name).is_file() for name in QWEN_WEIGHTS):
        raise CheckpointError(f"{qwen} has config.json but no weights (expected one of {', '.join(QWEN_WEIGHTS)}); "
                              "download the whole Qwen2.5-VL-7B-Instruct folder")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path} (truncated or not a safetensors file?): {e}") from e


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    check_keys({k: v.shape for k, v in module.state_dict().items()}, state, source)


def check_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str,
               origin: dict[str, Path] | None = None) -> None:
    """`check_state_dict` against expected shapes; `origin` (key -> shard file) names where a stray key is."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(
        f"{k} (in {origin[k].name})" if origin and k in origin else k for k in state.keys() - expected.keys()
    )
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k])}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k]
    )
    problems = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            problems.append(f"{len(keys)} {title}: {show_keys(keys)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def show_keys(keys: list[str], limit: int = 10) -> str:
    """The first `limit` keys, and how many more there are."""
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(
    build: Callable[[], nn.Module],
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    keymap: KeyMap | None = None,
) -> nn.Module:
    """Build a module on `meta` (no memory), then load `path` into it strictly, cast to dtype, on device.

    With a `keymap` the file is in the diffusers layout: its keys and shapes are checked against the
    module's in diffusers names (so errors name what the file holds), then converted.
    """
    with torch.device("meta"):
        module = build()
    state, origin = read_weights(Path(path), device=device)
    if keymap is None:
        check_state_dict(module, state, str(path))
    else:
        expected = keymap.to_diffusers(module.state_dict(), source=type(module).__name__)
        check_keys({k: v.shape for k, v in expected.items()}, state, str(path), origin)
        try:
            state = keymap.to_official(state, source=str(path))
        except KeyMapError as e:
            raise CheckpointError(str(e)) from e
    # float8-stored weights are upcast here: compute never runs in the storage format.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_dit(files: ModelFiles, config: ModelConfig, *, dtype: torch.dtype, device: str | torch.device) -> Step1XEdit:
    """The connector + DiT from either layout."""
    keymap = dit_keymap(config.dit.hidden_size, config.version) if files.layout == "diffusers" else None
    return load_into(lambda: Step1XEdit(config), files.dit, dtype=dtype, device=device, keymap=keymap)


def load_vae(files: ModelFiles, config: ModelConfig, *, device: str | torch.device) -> AutoEncoder:
    """The VAE from either layout, in fp32 (as upstream runs it)."""
    keymap = vae_keymap(len(config.vae.ch_mult)) if files.layout == "diffusers" else None
    return load_into(lambda: AutoEncoder(config.vae), files.vae, dtype=torch.float32, device=device, keymap=keymap)
