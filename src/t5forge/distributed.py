"""torch.distributed setup for `torchrun` launches: rank/world from the environment, DDP or FSDP2
wrapping (`distributed.strategy`), and what the training step asks of either wrapper.

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


def any_rank(flag: bool, world: World) -> bool:
    """Whether `flag` holds on some rank (one host-side all-reduce; `flag` in a single process)."""
    return bool(host_max([float(flag)], world)[0])


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp(model: torch.nn.Module, world: World, precision: str, reshard_after_forward: bool = True):
    """FSDP2 (`fully_shard`) over all ranks: each block of every stack (the encoder's, the decoder's,
    an hourglass encoder's: any module's `blocks` list) is one unit, gathered for its forward and
    backward; the root unit holds the rest (embedding, LM head, final norms, position biases).
    A tied LM head is the embedding's own parameter, so it is sharded once and stays tied.
    bf16: the gathered weights are bf16 copies of the fp32 shards the optimizer updates, and
    gradients are reduce-scattered in fp32. Call after the speed twins are swapped in (model/fast/):
    fully_shard swaps each unit's class for a subclass of it. The model keeps its type and state_dict
    names; its parameters become DTensors sharded on dim 0."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not world.distributed:
        return model
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    blocks = [block for module in model.modules() if isinstance(getattr(module, "blocks", None), torch.nn.ModuleList)
              for block in module.blocks]
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        # Entry points other than forward gather the weights too: the block twin's fused-residual
        # call (model/fast/stack.py), which its stack calls instead of forward.
        for method in FSDP_FORWARD_METHODS:
            if hasattr(block, method):
                register_fsdp_forward_method(block, method)
    # The root's weights (embedding, LM head) are used again right after the forward, by the loss:
    # fully_shard keeps a root unit's gathered weights until the backward.
    fully_shard(model, mp_policy=policy)
    return model


# Methods that run a block's weights without its forward: FSDP gathers the weights around them too.
FSDP_FORWARD_METHODS = ("forward_pending",)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def micro_step_sync(model: torch.nn.Module, core: torch.nn.Module, last: bool):
    """The context a micro-step's forward and backward run in: gradients are reduced over the ranks
    on the last micro-step of an optimizer step only. DDP: `no_sync()` before the last. FSDP2: the
    earlier micro-steps keep their gradients unsharded and local (no reduce-scatter) and keep the
    gathered weights (no reshard after the backward, so no second all-gather); the last one reduces
    the accumulated gradients once and reshards. `model` is what the loop calls (DDP, compiled),
    `core` the bare model inside it."""
    import contextlib

    if is_fsdp(core):
        core.set_requires_gradient_sync(last)
        core.set_reshard_after_backward(last)
        return contextlib.nullcontext()
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def plain_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm over sharded (DTensor) gradients is a DTensor: the plain tensor of its
    (replicated) value, so clipping, the non-finite check and the logs treat it as any norm."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def shutdown(world: World) -> None:
    global _HOST_GROUP
    _HOST_GROUP = None
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
