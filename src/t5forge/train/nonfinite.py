"""Non-finite steps: counted on the device, read only at log and checkpoint steps.

A step whose loss or gradient norm is NaN or infinite is skipped (train_step leaves weights and
optimizer state as they were); `NonfiniteSteps` counts such steps, in all and in a row, as 0-d
device tensors, so counting never waits for the device. After `optim.max_nonfinite_steps` in a
row the run rolls back to the newest checkpoint with a lowered learning rate (roll_back_if_due), or
stops with an error naming the step and the last (finite) checkpoint (optim.on_nonfinite); no
checkpoint is ever written from non-finite weights.
"""

from __future__ import annotations

import math
import warnings

import torch

from t5forge.errors import T5ForgeError


class NonfiniteSteps:
    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)

    def update(self, finite: torch.Tensor) -> None:
        bad = (~finite).long()
        self.total += bad
        self.in_a_row.mul_(bad).add_(bad)  # reset by a finite step

    def read(self) -> tuple[int, int]:
        """(skipped steps in all, in a row): a host read; call at log and checkpoint steps only."""
        return int(self.total), int(self.in_a_row)

    def check(self, step: int, last_checkpoint) -> int:
        """Skipped steps in all; a T5ForgeError after `limit` non-finite steps in a row.
        `last_checkpoint()` (it lists the run's checkpoints) is called only for that error's advice."""
        total, in_a_row = self.read()
        if in_a_row >= self.limit:
            raise nonfinite_error(step, in_a_row, last_checkpoint())
        return total


def nonfinite_error(step: int, in_a_row: int, last_checkpoint) -> T5ForgeError:
    where = (f"resume from the last checkpoint ({last_checkpoint}) with resume=auto" if last_checkpoint is not None
             else "restart the run (it has no checkpoint yet)")
    return T5ForgeError(
        f"the training loss or gradients were NaN/inf for {in_a_row} step(s) in a row up to step {step} "
        f"(optim.max_nonfinite_steps); lower optim.base_lr or check the data, then {where}"
    )


def check_weights_finite(model, step: int, last_checkpoint) -> None:
    """Refuse to checkpoint non-finite weights (one host read, at checkpoint time); `last_checkpoint()`
    is called only for the error's advice."""
    from t5forge.model.load import first_nonfinite

    bad = first_nonfinite(model)
    if bad is not None:
        last_checkpoint = last_checkpoint()
        where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
                 else "the run has no checkpoint yet")
        raise T5ForgeError(
            f"weight {bad!r} is NaN/inf at step {step}: not writing a checkpoint from it; {where}; "
            "lower optim.base_lr or check the data"
        )


def collapsed(loss: float, grad_norm: float, vocab_size: int) -> bool:
    """True for a run that learns nothing: every gradient zero and the loss at ln(vocab), the
    cross-entropy of uniform predictions (e.g. weights collapsed to zero)."""
    return grad_norm == 0.0 and abs(loss - math.log(vocab_size)) < 1e-3 * math.log(vocab_size)


def warn_if_collapsed(loss: float, grad_norm: float, vocab_size: int, step: int) -> bool:
    if not collapsed(loss, grad_norm, vocab_size):
        return False
    warnings.warn(
        f"step {step}: every gradient is zero and the loss is ln(vocab) = {math.log(vocab_size):.3f} "
        "(uniform predictions): the model has collapsed and cannot learn; check model.checkpoint_path's weights"
    )
    return True


def roll_back_if_due(parts, state, skipped: NonfiniteSteps):
    """After `limit` non-finite steps in a row (optim.on_nonfinite=rollback): restore this rank's
    weights, optimizer state, data position and RNGs from the newest checkpoint, set `state` (in
    place: other holders keep it) back to the checkpoint's counters with one more rollback and the
    learning rate times optim.rollback_lr_factor, and return the checkpoint's path. None when under
    the limit; a T5ForgeError with on_nonfinite=stop, without a checkpoint, or after
    optim.max_rollbacks. Every rank reads the same counters (from all-reduced values), so all agree."""

    from t5forge.train.checkpoint_parts import load_parts

    _, in_a_row = skipped.read()
    if in_a_row < skipped.limit:
        return None
    optim = parts.cfg.optim
    latest = parts.checkpointer.latest()
    if optim.on_nonfinite != "rollback" or latest is None:
        raise nonfinite_error(state.step, in_a_row, latest)
    if state.nonfinite_restarts >= optim.max_rollbacks:
        raise T5ForgeError(
            f"the training loss or gradients were NaN/inf for {in_a_row} step(s) in a row up to step {state.step} "
            f"after {state.nonfinite_restarts} rollback(s) (optim.max_rollbacks); lower optim.base_lr or check "
            f"the data, then resume from the last checkpoint ({latest}) with resume=auto"
        )
    step, restarts, factor = state.step, state.nonfinite_restarts + 1, state.lr_factor * optim.rollback_lr_factor
    # Every part of the run (weights, optimizer, counters into `state`, data position, RNGs, ...).
    load_parts(latest, parts.checkpoint_parts, rank=parts.world.rank, world_size=parts.world.world_size)
    state.nonfinite_restarts, state.lr_factor = restarts, factor
    parts.train_batches = parts.restart_data()
    skipped.total.zero_()
    skipped.in_a_row.zero_()
    parts.logger.log("rollback", step, to_step=state.step, checkpoint=str(latest), in_a_row=in_a_row,
                     lr_factor=factor, rollback=restarts)
    if parts.world.is_main:
        print(f"step {step}: {in_a_row} non-finite steps in a row; rolled back to checkpoint {latest} "
              f"(step {state.step}), learning rate x{factor:g} from now on "
              f"(rollback {restarts} of {optim.max_rollbacks})", flush=True)
    return latest
