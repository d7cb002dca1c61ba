"""The parallel layout: degrees, the process group (torchrun's environment) and a device mesh over it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Mesh order: ranks that share a CFG branch and a ring slot are one Ulysses group (innermost, the most
# traffic: every attention's all-to-all), as xDiT lays them out.
MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelDegrees:
    """How one edit is split: CFG branches (1 or 2), Ulysses (attention heads) and ring (sequence chunks)."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg_degree must be 1 or 2 (cond and uncond), got {self.cfg}")
        for name, value in (("ulysses_degree", self.ulysses), ("ring_degree", self.ring)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence(self) -> int:
        """Ranks that split one CFG branch's token sequence."""
        return self.ulysses * self.ring

    def __str__(self) -> str:
        degrees = (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring))
        split = [f"{name} {d}" for name, d in degrees if d > 1]
        return " x ".join(split) or "one process"

    def check_model(self, num_heads: int) -> None:
        if num_heads % self.ulysses:
            ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(f"ulysses_degree {self.ulysses} does not divide the DiT's {num_heads} attention heads; "
                             f"use one of {ok}")

    def check_tokens(self, txt_len: int, img_tokens: int) -> None:
        for what, n in (("text tokens", txt_len), ("image tokens (noisy + reference)", img_tokens)):
            if n % self.sequence:
                raise ValueError(f"ulysses_degree x ring_degree = {self.sequence} must divide the {n} {what}; "
                                 "choose another size_level or degree")


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the mesh and the process groups of each dimension."""

    degrees: ParallelDegrees
    mesh: DeviceMesh

    @property
    def cfg_rank(self) -> int:
        return self.mesh.get_local_rank("cfg")

    @property
    def sequence_rank(self) -> int:
        """Which chunk of the token sequence this rank holds: ring slot, then Ulysses rank within it."""
        return self.mesh.get_local_rank("ring") * self.degrees.ulysses + self.mesh.get_local_rank("ulysses")

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on GPUs (one GPU per rank), else the device asked for."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_launched(degrees: ParallelDegrees) -> None:
    """Fail before any model is built when the degrees ask for ranks that torchrun did not start."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "0"))
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"parallel degrees {degrees} need {degrees.world} processes: launch with "
                         f"`torchrun --nproc-per-node {degrees.world} ...`")
    if world != degrees.world:
        raise ValueError(f"parallel degrees {degrees} need {degrees.world} processes, torchrun started {world}")


def init_groups(degrees: ParallelDegrees, device: torch.device) -> ParallelGroups:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) and lay the mesh over it."""
    check_launched(degrees)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shape = (degrees.cfg, degrees.ring, degrees.ulysses)
    return ParallelGroups(degrees, init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS))


def is_leader() -> bool:
    """Rank 0 of a parallel run, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0
