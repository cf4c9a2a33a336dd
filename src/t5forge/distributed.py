"""torch.distributed setup for `torchrun` launches: rank/world from the environment, DDP wrapping.

A single process (no `torchrun`) is world size 1 and nothing here touches torch.distributed, so the
CPU path and the tests never need a process group. It sits at the package's top level, below every
part that needs the ranks: held-out evaluation sums over them (eval/loss.py), as do the training
loop and the commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_type: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return World(rank=rank, local_rank=local_rank, world_size=world_size)


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


_HOST_GROUP = None


def host_max(flags: list[float], world: World) -> list[float]:
    """The ranks' maximum of each host-side value (stop requests, clock-due saves).

    Reduced through a gloo group on the CPU, so under NCCL the host never waits for the GPU's queue
    (a device tensor would need a host read of the result every step)."""
    global _HOST_GROUP
    if not world.distributed:
        return list(flags)
    if _HOST_GROUP is None:  # every rank reaches its first call at the same step
        _HOST_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    t = torch.tensor(flags, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shutdown(world: World) -> None:
    global _HOST_GROUP
    _HOST_GROUP = None
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
