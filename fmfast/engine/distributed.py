"""torchrun support: process-group setup and the rank-strided split of each epoch's order."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun -> ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global sample order, padded by wrap-around so every rank runs
    the same number of steps (DistributedSampler's convention)."""
    if world == 1:
        return order
    n = -(-order.numel() // world) * world
    padded = torch.cat([order, order[: n - order.numel()]]) if n > order.numel() else order
    return padded[rank::world]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def cleanup(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
