"""Which process this is: rank, local rank and world size, from the launcher's env or torch."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from otel_train.env import launcher_int


@dataclass(frozen=True, slots=True, kw_only=True)
class RankInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1


def _env_int(name: str) -> int | None:
    return launcher_int(name)


def detect_ranks() -> RankInfo:
    """torchrun / deepspeed / accelerate set RANK, LOCAL_RANK, WORLD_SIZE; SLURM its own.

    An initialised torch.distributed group wins (it is the truth the job runs on); torch is
    only consulted when the program already imported it.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            local = _env_int("LOCAL_RANK")
            return RankInfo(
                rank=dist.get_rank(),
                local_rank=local if local is not None else 0,
                world_size=dist.get_world_size(),
            )
    rank = _env_int("RANK")
    if rank is None:
        rank = _env_int("SLURM_PROCID")
    world = _env_int("WORLD_SIZE")
    if world is None:
        world = _env_int("SLURM_NTASKS")
    local = _env_int("LOCAL_RANK")
    if local is None:
        local = _env_int("SLURM_LOCALID")
    return RankInfo(
        rank=rank or 0,
        local_rank=local if local is not None else 0,
        world_size=world or 1,
    )
