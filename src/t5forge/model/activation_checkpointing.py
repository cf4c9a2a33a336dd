"""Activation checkpointing per block (`model.activation_checkpointing=none|full|selective`).

    report = activation_checkpointing.apply(model, "full")     # after fast.apply, before DDP / compile

A checkpointed block keeps only its inputs for the backward pass and runs its forward a second
time there to rebuild what the backward needs (torch.utils.checkpoint, non-reentrant). The trade:
activation memory of one block instead of all of them, for one more forward of the checkpointed
blocks (about a third more compute per step for "full").

    none        every activation kept (the default)
    full        every block of every stack checkpointed (encoder, decoder, and the Hourglass
                encoder's blocks, which live in the same `blocks` list)
    selective   every other block checkpointed (blocks 0, 2, 4, ... of each stack): about half of
                full's saving for half its recompute. A block, not an op, is the unit: the op-level
                policy (keep matmul outputs, recompute the elementwise ops) would have to know which
                random ops it replays, and T5's dropout sits inside the attention kernel too.

How: like the speed twins (model/fast/), the block's class is swapped in place for a subclass whose
`forward` (and `forward_pending`, the fused-residual twin's form) runs the original under
`checkpoint`. Nothing is wrapped, so parameter names, the state dict, HF export and optimizer groups
are exactly the unconverted model's (FSDP2's fully_shard swaps classes the same way). The
recomputed forward is the same computation:

- RNG: torch.utils.checkpoint restores the RNG state for the recompute (preserve_rng_state), so
  dropout draws the same masks and losses and gradients are bit-identical to no checkpointing.
- Auxiliary losses (a router's, model/outputs.py): the first forward sets them and `T5.forward`
  collects them; the recompute inside the backward would set them again, after that collection,
  holding the recomputed graph alive until the next forward. The recompute's terms are dropped.
- No-grad passes (evaluation) and the generation cache run the block as it is: there is no backward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

MODES = ("none", "full", "selective")


def checkpointed_blocks(n_blocks: int, mode: str) -> list[int]:
    """The indices of a stack's blocks that `mode` checkpoints."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: one of {', '.join(MODES)}")
    if mode == "full":
        return list(range(n_blocks))
    if mode == "selective":
        return list(range(0, n_blocks, 2))
    return []


def apply(model: nn.Module, mode: str) -> dict:
    """Checkpoint the blocks `mode` selects in every stack of `model` (modules with a `blocks`
    ModuleList: Stack and its subclasses), in place; returns {stack name: checkpointed indices}.
    Call after fast.apply (its stack twin decides the fused residual from the blocks' exact types)."""
    checkpointed_blocks(0, mode)  # an unknown mode fails here
    report = {}
    if mode == "none":
        return report
    from t5forge.model.t5 import Stack

    for name, stack in model.named_modules():
        if not isinstance(stack, Stack):
            continue
        chosen = checkpointed_blocks(len(stack.blocks), mode)
        for i in chosen:
            block = stack.blocks[i]
            if not isinstance(block, CheckpointedBlock):
                block.__class__ = checkpointed_class(type(block))
        report[name or "model"] = chosen
    log.info("activation checkpointing %s: %s", mode,
             "; ".join(f"{name} blocks {_ranges(ix)}" for name, ix in report.items()) or "no stacks")
    return report


def _ranges(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if indices else "none"


def enabled_in(model: nn.Module) -> bool:
    """Whether any block of `model` runs checkpointed."""
    return any(isinstance(module, CheckpointedBlock) for module in model.modules())


class CheckpointedBlock:
    """Mixin before a block class: its forward (and forward_pending, where the class has one) runs
    under torch.utils.checkpoint while gradients are recorded and no generation cache is passed."""

    def forward(self, *args, **kwargs):  # (x, self_bias, enc, cross_bias, cache)
        return self._checkpointed(super().forward, args, kwargs, cache_at=4)

    def _checkpointed(self, fn, args, kwargs, cache_at: int):
        cache = kwargs.get("cache", args[cache_at] if len(args) > cache_at else None)
        if cache is not None or not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if torch.compiler.is_compiling():  # the compiled graph's partitioner does the recompute
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        calls = 0

        def run(*a, **kw):
            nonlocal calls
            calls += 1
            try:
                return fn(*a, **kw)
            finally:
                if calls > 1:  # the recompute in the backward (it may stop early: hence finally)
                    _drop_aux_losses(self)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)


class _PendingForward:
    """The fused-residual twin's `forward_pending`, checkpointed as `forward` is."""

    def forward_pending(self, *args, **kwargs):  # (x, delta, self_bias, enc, cross_bias, cache)
        return self._checkpointed(super().forward_pending, args, kwargs, cache_at=5)


def _drop_aux_losses(module: nn.Module) -> None:
    for sub in module.modules():
        if sub.__dict__.get("aux_losses"):
            sub.aux_losses = {}


_CLASSES: dict[type, type] = {}


def checkpointed_class(cls: type) -> type:
    """The checkpointed subclass of block class `cls` (one per class, kept for the process)."""
    if cls not in _CLASSES:
        bases = (CheckpointedBlock,) + ((_PendingForward,) if hasattr(cls, "forward_pending") else ()) + (cls,)
        name = f"Checkpointed{cls.__name__}"
        _CLASSES[cls] = type(name, bases, {"__module__": __name__, "__qualname__": name})
    return _CLASSES[cls]
