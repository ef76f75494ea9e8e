"""torchrun support: process-group setup and the rank-strided split of each epoch's order.

Every collective has a timeout (``FMFAST_DIST_TIMEOUT`` seconds, default 120): a rank whose
peer died or hangs fails within that time instead of waiting forever, and the failure is one
``TrainingError`` line (``peer_errors``); torchrun then ends the other ranks."""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from fmfast.errors import SettingsError, TrainingError


def timeout_seconds() -> float:
    text = os.environ.get("FMFAST_DIST_TIMEOUT", "120")
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not 0 < t < 1e7:
        raise SettingsError(f"FMFAST_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return t


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun -> ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
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


@contextlib.contextmanager
def peer_errors(world: int, rank: int):
    """A collective that failed because a peer died, hung past the timeout or closed its
    connection -> one TrainingError line (not a traceback, never a hang)."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if world == 1 or not isinstance(e, dist.DistError) and not _peer_trouble(str(e)):
            raise
        first = " ".join(str(e).split())[:200]
        raise TrainingError(f"rank {rank} of {world}: lost a peer process ({first}); the run stops here -- "
                            f"resume it from last.pt with --resume") from None


def _peer_trouble(text: str) -> bool:
    return any(k in text for k in ("Connection reset", "Connection closed", "timed out", "Timeout", "gloo",
                                   "NCCL", "Broken pipe", "peer"))
