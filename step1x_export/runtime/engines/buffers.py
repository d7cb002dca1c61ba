"""Static buffers: the shapes of an edit, checked against an engine's profile, allocated once per shape.

The plan comes from the I/O spec (`specs.py`) and the edit's dims; nothing here repeats a shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...specs import ComponentSpec, DimRanges
from ...step1x_ref.configs import ModelConfig

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


class ProfileError(ValueError):
    """An edit's shapes fall outside what an engine was built or exported for."""


def edit_dims(config: ModelConfig, width: int, height: int, batch: int, txt_len: int | None = None, *,
              reference: bool = True) -> dict[str, int]:
    """Every named dim of the specs for an edit of width x height pixels (multiples of 16).

    `txt_len`: the text tokens the DiT reads (v1.2: known after the MLLM; default max_length); without
    `reference` (text-to-image) the DiT sees the noisy tokens only."""
    n = (width // 16) * (height // 16) * (2 if reference else 1)
    txt = config.embedder.max_length if txt_len is None else txt_len
    return {
        "batch": batch,
        "img_tokens": n,
        "txt_len": txt,
        "seq_len": txt + n,
        "height": height,
        "width": width,
        "lat_h": height // 8,
        "lat_w": width // 8,
    }


def check_dims(spec: ComponentSpec, dims: dict[str, int], ranges: DimRanges) -> None:
    """Raise ProfileError naming the component, the dim and its min/max if `dims` are outside `ranges`."""
    bad = [
        f"{name} = {dims[name]} (expected {ranges[name][0]}..{ranges[name][2]})"
        for name in sorted(spec.dim_names())
        if name in ranges and not ranges[name][0] <= dims[name] <= ranges[name][2]
    ]
    if bad:
        raise ProfileError(f"{spec.name}: this edit's shapes are outside the engine's profile: {'; '.join(bad)}. "
                           "Use a size_level (and aspect ratio) inside the profile, or rebuild with a wider one.")


def profile_shapes(spec: ComponentSpec, ranges: DimRanges) -> ProfileShapes:
    """min/opt/max shape of every input (a TensorRT optimization profile) from the dims' ranges."""
    picks = [{d: r[i] for d, r in ranges.items()} for i in range(3)]
    return {t.name: tuple(t.shape(p) for p in picks) for t in spec.inputs}  # type: ignore[misc]


def fits(shapes: dict[str, Shape], profile: ProfileShapes) -> bool:
    return all(
        len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi, strict=True))
        for n, (lo, _, hi) in profile.items()
    )


def select_profile(component: str, shapes: dict[str, Shape], profiles: list[ProfileShapes]) -> int:
    """Index of the first profile covering every input shape; ProfileError listing the ranges otherwise."""
    for i, profile in enumerate(profiles):
        if fits(shapes, profile):
            return i
    expected = " | ".join(
        ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.items() if lo != hi) for p in profiles
    )
    got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    raise ProfileError(f"{component}: input shapes {got} fit none of its {len(profiles)} profile(s): {expected}")


@dataclass(frozen=True)
class BufferSpec:
    shape: Shape
    dtype: torch.dtype


def plan_buffers(spec: ComponentSpec, dims: dict[str, int], compute_dtype: torch.dtype) -> dict[str, BufferSpec]:
    """Shape and dtype of every input and output of `spec` for one edit."""
    return {
        t.name: BufferSpec(t.shape(dims), t.torch_dtype(compute_dtype)) for t in (*spec.inputs, *spec.outputs)
    }


class BufferPool:
    """One pool of static tensors shared by every stage: a (key, shape, dtype) is allocated once, then reused.

    Stages that exchange a tensor (the VAE encoder's latent, the DiT's inputs) can ask for the same key.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, Shape, torch.dtype], torch.Tensor] = {}
        self.allocations = 0  # how many tensors were ever allocated (tests check reuse with it)

    def get(self, key: str, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        k = (key, tuple(shape), dtype)
        if k not in self._buffers:
            self._buffers[k] = torch.empty(shape, dtype=dtype, device=self.device)
            self.allocations += 1
        return self._buffers[k]

    def bind(self, spec: ComponentSpec, plan: dict[str, BufferSpec]) -> dict[str, torch.Tensor]:
        """Static tensors for every input and output of `spec`, keyed `component.tensor`."""
        return {name: self.get(f"{spec.name}.{name}", b.shape, b.dtype) for name, b in plan.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
