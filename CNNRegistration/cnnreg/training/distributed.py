"""Data-parallel training under ``torchrun``: joining the process group and reducing sums.

Each process of ``torchrun --nproc_per_node=N -m cnnreg train ...`` reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; gloo is used on CPU and NCCL on CUDA (one GPU per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (a single process: rank 0 of 1, disabled)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Resolve the device and, under ``torchrun`` (``WORLD_SIZE`` > 1), join the process group
    (gloo on CPU, NCCL on CUDA; one GPU per process, ``cuda:LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return Distributed(), device
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank, True), device


def all_reduce_sum(values: list[float], info: Distributed, device: torch.device) -> list[float]:
    """Sum ``values`` over the processes (unchanged when not distributed)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def leave_distributed(info: Distributed, *, finished: bool = True) -> None:
    """Leave the process group (nothing when not distributed).  After a finished run the processes
    first meet at a barrier, so that none tears down its connections (and rank 0 its store) while a
    peer is still inside the last collective; after a failure each leaves at once, since a barrier
    would wait for a peer that may be gone."""
    if not (info.enabled and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
