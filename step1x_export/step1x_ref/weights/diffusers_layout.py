"""The diffusers layout of Step1X-Edit (`Step1X-Edit-v1p1-diffusers`, and v1.2): its folders and its key names.

One literal table per module maps an official key pattern to its diffusers name(s); the same table
converts both ways. A row's `official` and `diffusers` patterns may hold integer fields (`{i}`, `{j}`,
`{u}`) and end in `*` (any remaining key, e.g. `weight` / `bias`). `{u}` counts from the other end on the
diffusers side (diffusers numbers the VAE decoder's up blocks from the bottom). `op` says what happens
to the tensor: a fused projection is split into its parts (and concatenated back), the final layer's
modulation halves are swapped ([shift, scale] -> [scale, shift]), a 1x1 conv becomes a Linear.

The DiT table is the inverse of the diffusers port's `convert_step1x_edit_transformer_checkpoint_to_diffusers`
(Peyton-Chen/diffusers, branch step1xedit, scripts/convert_step1x_edit_to_diffusers.py); the VAE table
gives diffusers' `AutoencoderKL` names (that script's `convert_step1x_edit_vae_checkpoint_to_diffusers`).
A new weight (v1.2's `text_token_mapping`) is one more row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

Op = Literal["rename", "qkv", "linear1", "swap", "conv1x1"]
Direction = Literal["diffusers", "official"]

# Folder / file names of the layout (model_index.json names the components).
MODEL_INDEX = "model_index.json"
TRANSFORMER_DIR, VAE_DIR, TEXT_ENCODER_DIR, PROCESSOR_DIR = "transformer", "vae", "text_encoder", "processor"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# model_index.json's pipeline class -> the version its weights are
PIPELINE_VERSIONS = {"Step1XEditPipeline": "v1.1", "Step1XEditPipelineV1P2": "v1.2"}


class KeyMapError(ValueError):
    """A key with no counterpart in the other layout, or a fused tensor with parts missing."""


@dataclass(frozen=True)
class Rule:
    official: str
    diffusers: str | tuple[str, ...]
    op: Op = "rename"
    _regex: dict[str, tuple[re.Pattern[str], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = (self.diffusers,) if isinstance(self.diffusers, str) else self.diffusers
        object.__setattr__(self, "diffusers", parts)
        regex = {"official": (_compile(self.official),), "diffusers": tuple(_compile(p) for p in parts)}
        object.__setattr__(self, "_regex", regex)


def _compile(pattern: str) -> re.Pattern[str]:
    out = re.escape(pattern)
    out = re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", out)
    if out.endswith(r"\*"):
        out = out[:-2] + r"(?P<rest>.+)"
    return re.compile(out + "$")


_ATTN = ("to_q", "to_k", "to_v")  # a fused qkv's parts in diffusers: image stream / single blocks
_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")  # text stream

DIT_RULES: tuple[Rule, ...] = (
    Rule("img_in.*", "x_embedder.*"),
    Rule("txt_in.*", "context_embedder.*"),
    Rule("time_in.*", "time_embed.*"),
    Rule("vector_in.*", "vec_embed.*"),
    Rule("connector.*", "connector.*"),
    Rule("double_blocks.{i}.img_mod.lin.*", "transformer_blocks.{i}.norm1.linear.*"),
    Rule("double_blocks.{i}.txt_mod.lin.*", "transformer_blocks.{i}.norm1_context.linear.*"),
    Rule("double_blocks.{i}.img_attn.qkv.*", tuple(f"transformer_blocks.{{i}}.attn.{p}.*" for p in _ATTN), "qkv"),
    Rule("double_blocks.{i}.txt_attn.qkv.*", tuple(f"transformer_blocks.{{i}}.attn.{p}.*" for p in _ADDED), "qkv"),
    Rule("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    Rule("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    Rule("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    Rule("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    Rule("double_blocks.{i}.img_attn.proj.*", "transformer_blocks.{i}.attn.to_out.0.*"),
    Rule("double_blocks.{i}.txt_attn.proj.*", "transformer_blocks.{i}.attn.to_add_out.*"),
    Rule("double_blocks.{i}.img_mlp.0.*", "transformer_blocks.{i}.ff.net.0.proj.*"),
    Rule("double_blocks.{i}.img_mlp.2.*", "transformer_blocks.{i}.ff.net.2.*"),
    Rule("double_blocks.{i}.txt_mlp.0.*", "transformer_blocks.{i}.ff_context.net.0.proj.*"),
    Rule("double_blocks.{i}.txt_mlp.2.*", "transformer_blocks.{i}.ff_context.net.2.*"),
    Rule("single_blocks.{i}.linear1.*",
         (*(f"single_transformer_blocks.{{i}}.attn.{p}.*" for p in _ATTN), "single_transformer_blocks.{i}.proj_mlp.*"),
         "linear1"),
    Rule("single_blocks.{i}.linear2.*", "single_transformer_blocks.{i}.proj_out.*"),
    Rule("single_blocks.{i}.modulation.lin.*", "single_transformer_blocks.{i}.norm.linear.*"),
    Rule("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    Rule("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    Rule("final_layer.linear.*", "proj_out.*"),
    Rule("final_layer.adaLN_modulation.1.*", "norm_out.linear.*", "swap"),
)


def _vae_mid_rules(stage: str) -> tuple[Rule, ...]:
    mid, attn = f"{stage}.mid_block", f"{stage}.mid_block.attentions.0"
    return (
        Rule(f"{stage}.mid.block_1.*", f"{mid}.resnets.0.*"),
        Rule(f"{stage}.mid.block_2.*", f"{mid}.resnets.1.*"),
        Rule(f"{stage}.mid.attn_1.norm.*", f"{attn}.group_norm.*"),
        Rule(f"{stage}.mid.attn_1.q.*", f"{attn}.to_q.*", "conv1x1"),
        Rule(f"{stage}.mid.attn_1.k.*", f"{attn}.to_k.*", "conv1x1"),
        Rule(f"{stage}.mid.attn_1.v.*", f"{attn}.to_v.*", "conv1x1"),
        Rule(f"{stage}.mid.attn_1.proj_out.*", f"{attn}.to_out.0.*", "conv1x1"),
        Rule(f"{stage}.conv_in.*", f"{stage}.conv_in.*"),
        Rule(f"{stage}.conv_out.*", f"{stage}.conv_out.*"),
        Rule(f"{stage}.norm_out.*", f"{stage}.conv_norm_out.*"),
    )


VAE_RULES: tuple[Rule, ...] = (
    *_vae_mid_rules("encoder"),
    *_vae_mid_rules("decoder"),
    Rule("encoder.down.{i}.block.{j}.nin_shortcut.*", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.*"),
    Rule("encoder.down.{i}.block.{j}.*", "encoder.down_blocks.{i}.resnets.{j}.*"),
    Rule("encoder.down.{i}.downsample.conv.*", "encoder.down_blocks.{i}.downsamplers.0.conv.*"),
    Rule("decoder.up.{u}.block.{j}.nin_shortcut.*", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.*"),
    Rule("decoder.up.{u}.block.{j}.*", "decoder.up_blocks.{u}.resnets.{j}.*"),
    Rule("decoder.up.{u}.upsample.conv.*", "decoder.up_blocks.{u}.upsamplers.0.conv.*"),
)


@dataclass(frozen=True)
class KeyMap:
    """A rule table with the sizes its ops need: the DiT's hidden size (single blocks' q/k/v parts of
    linear1) and the VAE's number of levels (the reversed `{u}` index)."""

    rules: tuple[Rule, ...]
    hidden_size: int = 0
    levels: int = 0

    def to_diffusers(self, state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            rule, fields = self._match_official(key, source)
            names = [self._fill(p, fields) for p in rule.diffusers]
            for name, part in zip(names, _split(rule.op, value, self.hidden_size), strict=True):
                out[name] = part
        return out

    def to_official(self, state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
        parts: dict[str, dict[int, torch.Tensor]] = {}
        found: dict[str, tuple[Rule, dict[str, str]]] = {}
        for key, value in state.items():
            rule, fields, index = self._match_any(key, source)
            name = self._fill(rule.official, fields)
            parts.setdefault(name, {})[index] = value
            found[name] = (rule, fields)
        out = {}
        for name, got in parts.items():
            rule, fields = found[name]
            if len(got) != len(rule.diffusers):
                lacking = [self._fill(p, fields) for i, p in enumerate(rule.diffusers) if i not in got]
                raise KeyMapError(f"{source}: {name} is split into {len(rule.diffusers)} tensors; missing "
                                  f"{', '.join(lacking)}")
            out[name] = _join(rule.op, [got[i] for i in range(len(got))])
        return out

    def _match_official(self, key: str, source: str) -> tuple[Rule, dict[str, str]]:
        for rule in self.rules:
            m = rule._regex["official"][0].match(key)
            if m:
                return rule, self._fields(m)
        raise KeyMapError(f"{source}: no diffusers name for key {key!r}")

    def _match_any(self, key: str, source: str) -> tuple[Rule, dict[str, str], int]:
        for rule in self.rules:
            for index, regex in enumerate(rule._regex["diffusers"]):
                m = regex.match(key)
                if m:
                    return rule, self._fields(m), index
        raise KeyMapError(f"{source}: key {key!r} has no place in this model (no official name)")

    def _fields(self, m: re.Match[str]) -> dict[str, str]:
        fields = dict(m.groupdict())
        if "u" in fields:  # decoder up blocks: official counts from the top, diffusers from the bottom
            fields["u"] = str(self.levels - 1 - int(fields["u"]))
        return fields

    @staticmethod
    def _fill(pattern: str, fields: dict[str, str]) -> str:
        rest = fields.get("rest")
        name = pattern[:-1] + rest if pattern.endswith("*") and rest is not None else pattern
        return name.format(**{k: v for k, v in fields.items() if k != "rest"})


def _split(op: Op, value: torch.Tensor, hidden: int) -> list[torch.Tensor]:
    if op == "qkv":
        return list(value.chunk(3, dim=0))
    if op == "linear1":
        return list(value.split([hidden, hidden, hidden, value.shape[0] - 3 * hidden], dim=0))
    if op == "swap":
        shift, scale = value.chunk(2, dim=0)
        return [torch.cat([scale, shift], dim=0)]
    if op == "conv1x1" and value.ndim == 4:
        return [value.flatten(1)]
    return [value]


def _join(op: Op, parts: list[torch.Tensor]) -> torch.Tensor:
    if op in ("qkv", "linear1"):
        return torch.cat(parts, dim=0)
    (value,) = parts
    if op == "swap":
        return _split("swap", value, 0)[0]  # swapping the halves is its own inverse
    if op == "conv1x1" and value.ndim == 2:
        return value[:, :, None, None]
    return value


# Weights a later version adds to the transformer, one row each (both layouts may use the same name).
# v1.2's quoted-character token mapping has the same name in both layouts.
EXTRA_DIT_RULES: dict[str, tuple[Rule, ...]] = {"v1.2": (Rule("text_token_mapping.*", "text_token_mapping.*"),)}


def dit_keymap(hidden_size: int, version: str = "v1.1") -> KeyMap:
    """The transformer's map for `version` (its extra rows appended)."""
    return KeyMap(DIT_RULES + EXTRA_DIT_RULES.get(version, ()), hidden_size=hidden_size)


def vae_keymap(levels: int) -> KeyMap:
    return KeyMap(VAE_RULES, levels=levels)



def write_weights(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> None:
    """`state` as diffusers writes a model folder's weights: one file, or `shards` files plus their index."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / WEIGHTS_FILE))
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = WEIGHTS_FILE.replace(".safetensors", f"-{i + 1:05d}-of-{shards:05d}.safetensors")
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_model_index(root: Path, version: str) -> None:
    """The model_index.json naming the components (as the published folders have it)."""
    classes = [name for name, v in PIPELINE_VERSIONS.items() if v == version]
    if not classes:
        raise KeyMapError(f"{version} has no diffusers layout (published: {', '.join(PIPELINE_VERSIONS.values())})")
    index = {
        "_class_name": classes[0],
        "processor": ["transformers", "Qwen2_5_VLProcessor"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "transformer": ["diffusers", "Step1XEditTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / MODEL_INDEX).write_text(json.dumps(index, indent=2))
