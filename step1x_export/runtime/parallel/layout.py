"""The parallel layout: degrees, the process group (torchrun's environment) and a device mesh over it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .degrees import ParallelDegrees

# Mesh order: ranks that share a CFG branch and a ring slot are one Ulysses group (innermost, the most
# traffic: every attention's all-to-all), as xDiT lays them out.
MESH_DIMS = ("cfg", "ring", "ulysses")


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
