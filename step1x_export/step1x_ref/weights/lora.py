"""LoRA files from upstream's fine-tuning scripts (kohya / sd-scripts format), merged into the DiT's weights.

A file holds, per adapted Linear, `{name}.lora_down.weight` [rank, in], `{name}.lora_up.weight` [out, rank]
and `{name}.alpha`; `name` is `lora_unet_` + the module's path with dots as underscores
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_3_linear1`, `lora_unet_txt_in`).
Merging follows upstream's `LoRAInfModule.merge_to` (library/lora_module.py): in fp32,
W += multiplier * (up @ down) * alpha / rank, cast back to the weight's dtype. Upstream always merges (no
runtime adapter), so a merged model is what export, calibration and every engine see.

Upstream adapts every Linear inside the double and single blocks and, optionally, the input embedders
(`img_in`, `time_in`, `vector_in`, `txt_in`); a key naming anything else (the connector, the text
encoder's `lora_te*`, a DoRA scale) is refused with its name rather than silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...hashing import file_sha256
from .loading import CheckpointError, read_safetensors, show_keys

PREFIX = "lora_unet_"
# The DiT remembers what was merged into it (file name, sha256, multiplier, in order), so an export of it
# can say which LoRAs its weights carry.
MERGED_ATTR = "merged_loras"
# Where upstream's LoRA network puts adapters: the blocks' Linears, and the embedders it may add (in_dims).
TARGET_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "time_in.", "vector_in.", "txt_in")
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


class LoraError(ValueError):
    """A LoRA file that cannot be merged into this model (unknown keys, wrong shapes, unreadable)."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: its file and the user's multiplier (upstream's `--lora` uses 1.0)."""

    path: Path
    multiplier: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`FILE` or `FILE:SCALE` (the part after the last colon is the scale when it is a number)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text))


@dataclass(frozen=True)
class LoraLayer:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, multiplier: float) -> torch.Tensor:
        """multiplier * (up @ down) * alpha / rank, in fp32 [out, in]."""
        return multiplier * (self.up.float() @ self.down.float()) * (self.alpha / self.rank)


def lora_name(module_name: str) -> str:
    return PREFIX + module_name.replace(".", "_")


def lora_targets(model: nn.Module) -> dict[str, str]:
    """kohya name -> module path of every Linear upstream's LoRA network may adapt."""
    return {
        lora_name(name): name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(TARGET_ROOTS)
    }


def read_lora(path: str | Path) -> dict[str, LoraLayer]:
    """The layers of a kohya-format LoRA file; keys that are not down/up/alpha triplets are refused."""
    path = Path(path)
    try:
        state = read_safetensors(path)
    except CheckpointError as e:
        raise LoraError(f"LoRA {e}") from e
    groups: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for key, value in state.items():
        name, _, part = key.partition(".")
        if part not in _PARTS:
            odd.append(key)
            continue
        groups.setdefault(name, {})[_PARTS[part]] = value
    if odd:
        raise LoraError(f"LoRA {path}: {len(odd)} keys are not lora_down/lora_up/alpha: {show_keys(odd)}")
    layers = {}
    for name, g in groups.items():
        if "down" not in g or "up" not in g:
            raise LoraError(f"LoRA {path}: {name} lacks {'lora_down' if 'down' not in g else 'lora_up'}.weight")
        down, up = g["down"], g["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"LoRA {path}: {name} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                            "expected [rank, in] and [out, rank]")
        # alpha 0 or absent means "no scaling" (alpha = rank), as kohya's LoRAModule has it
        alpha = float(g["alpha"]) if "alpha" in g and float(g["alpha"]) != 0 else float(down.shape[0])
        layers[name] = LoraLayer(down, up, alpha)
    return layers


def check_lora(model: nn.Module, layers: dict[str, LoraLayer], source: str) -> dict[str, nn.Linear]:
    """The Linear each layer adapts; raise LoraError naming every key that matches no module or mis-fits."""
    targets = lora_targets(model)
    unmatched = sorted(n for n in layers if n not in targets)
    if unmatched:
        hint = " (text-encoder LoRA is not supported)" if any(n.startswith("lora_te") for n in unmatched) else ""
        raise LoraError(f"LoRA {source}: {len(unmatched)} layers match no module of the DiT{hint}: "
                        f"{show_keys(unmatched)}")
    modules = {n: model.get_submodule(targets[n]) for n in layers}
    wrong = [f"{n}: LoRA {tuple(layers[n].up.shape[:1]) + tuple(layers[n].down.shape[1:])}, "
             f"weight {tuple(m.weight.shape)}"
             for n, m in modules.items() if (layers[n].up.shape[0], layers[n].down.shape[1]) != tuple(m.weight.shape)]
    if wrong:
        raise LoraError(f"LoRA {source}: shapes do not fit the model: {show_keys(wrong)}")
    return modules  # type: ignore[return-value]


def merge_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Merge one LoRA file into `model` in place; returns the weight names it changed."""
    return merge_loras(model, [spec])


@torch.no_grad()
def merge_loras(model: nn.Module, specs: Iterable[LoraSpec]) -> list[str]:
    """Merge several LoRAs in order (each onto the previous result, as upstream merges one by one); every
    file is read and checked before any weight changes, so a bad file leaves the model as it was."""
    targets = lora_targets(model)
    loaded = []
    for spec in specs:
        layers = read_lora(spec.path)
        loaded.append((spec, layers, check_lora(model, layers, str(spec.path))))
    changed: list[str] = []
    for spec, layers, modules in loaded:
        for name, layer in layers.items():
            weight = modules[name].weight
            weight.copy_((weight.float() + layer.delta(spec.multiplier).to(weight.device)).to(weight.dtype))
            if f"{targets[name]}.weight" not in changed:
                changed.append(f"{targets[name]}.weight")
        setattr(model, MERGED_ATTR, [*merged_loras(model), {"file": spec.path.name, "sha256": file_sha256(spec.path),
                                                              "multiplier": spec.multiplier}])
    return changed


def merged_loras(model: nn.Module) -> list[dict]:
    """The LoRAs merged into `model` by `merge_loras`, in order: [{"file", "sha256", "multiplier"}]."""
    return list(getattr(model, MERGED_ATTR, []))
