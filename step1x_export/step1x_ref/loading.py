"""Loading the official checkpoint files: build on `meta`, strict keys, `assign=True`.

Errors name the file and the offending keys; nothing is remapped (our module names are the
official ones), and a file's dtype (bf16 or float8_e4m3fn) is cast to the dtype asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

DIT_FILES = {
    "v1.0": ("step1x-edit-i1258.safetensors", "step1x-edit-i1258-FP8.safetensors"),
    "v1.1": ("step1x-edit-v1p1-official.safetensors",),
    # v1.2 is published in the diffusers layout only; this official-style name is what `save_pretrained`
    # writes (keys as v1.1's plus `text_token_mapping.weight/bias`).
    "v1.2": ("step1x-edit-v1p2-official.safetensors",),
}
VAE_FILE = "vae.safetensors"
QWEN_DIR = "Qwen2.5-VL-7B-Instruct"
# What a Hugging Face model folder holds its weights in (single file or sharded, safetensors or pickle).
QWEN_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model it is loaded into."""


@dataclass(frozen=True)
class ModelFiles:
    dit: Path
    vae: Path
    qwen: Path

    @classmethod
    def in_dir(cls, model_dir: str | Path, version: str) -> ModelFiles:
        """Find the files of `version` in `model_dir` (the layout the official download has)."""
        root = Path(model_dir)
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"model directory {root} is a file, not a folder")
        if not root.is_dir():
            raise CheckpointError(f"model directory {root} does not exist")
        names = DIT_FILES.get(version)
        if names is None:
            raise CheckpointError(f"unknown version {version!r}; known: {', '.join(DIT_FILES)}")
        dit = next((root / n for n in names if (root / n).is_file()), None)
        if dit is None:
            raise CheckpointError(f"no {version} DiT checkpoint in {root}: expected one of {', '.join(names)}")
        vae, qwen = root / VAE_FILE, root / QWEN_DIR
        if not vae.is_file():
            raise CheckpointError(f"missing VAE checkpoint {vae}")
        check_qwen_dir(qwen)
        return cls(dit=dit, vae=vae, qwen=qwen)


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
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k])}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k]
    )
    problems = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            shown = ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
            problems.append(f"{len(keys)} {title}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_into(
    build: Callable[[], nn.Module],
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build a module on `meta` (no memory), then load `path` into it strictly, cast to dtype, on device."""
    with torch.device("meta"):
        module = build()
    state = read_safetensors(path, device=device)
    check_state_dict(module, state, str(path))
    # float8-stored weights are upcast here: compute never runs in the storage format.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
