"""The resumable fine-tuning loader: a list of Seq2SeqExample -> shuffled, sharded, collated micro-batches.

An epoch is one pass over all N examples in an order drawn from (seed, epoch). The order is cut
into optimizer steps of `batch_size` examples (global: all ranks, all micro-steps), the last one
partial, so an epoch is exactly ceil(N / batch_size) steps -- the number `plan.make_plan` counts --
and epochs never straddle a step, whatever the world size or gradient accumulation.

Inside a step the examples are dealt round-robin to its world_size x grad_acc micro-batch slots
(micro-step j of rank r is slot j * world_size + r): ranks never share an example, every example is
seen once per epoch, and a full step gives each slot exactly `batch_size / (world_size * grad_acc)`.
When the last, partial step has fewer examples than slots, an empty slot gets a filler: the step's
first example with every label set to -100, which adds no loss and no gradient but keeps every rank
stepping in lockstep (DDP needs the same number of micro-batches everywhere).

Training references: with several references, one is drawn per example (Tk-Instruct's
`random.choice`) from an RNG keyed by (seed, epoch, step, slot), so a resumed loader draws the same.
The state is just (epoch, position = micro-batches this rank has yielded in the epoch).

A step's examples do not depend on the world size or gradient accumulation, only on the global
batch size: a checkpoint (always at a step boundary) resumes on another number of ranks or another
optim.grad_acc at the same step of the epoch, its examples dealt to the new slots. A changed
optim.batch_size (or data set, or seed) would cut the epoch into other steps and is refused.

Packed (`pack=True`): each micro-batch holds the same examples, in fewer rows with segment ids
(data/packing.py); batching, resume state and step accounting do not change.

Training loaders repeat epochs forever (the loop stops by steps); evaluation loaders
(`train=False`) make one pass in the given order with the first reference of each example.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

from t5forge.config import check_value
from t5forge.data.seq2seq import Seq2SeqExample, collate_packed, collate_seq2seq
from t5forge.errors import T5ForgeError
from t5forge.plan import split_batch

STATE_VERSION = 1


class FinetuneLoader:
    """Iterate to get dict(input_ids, attention_mask, labels) micro-batches for this rank."""

    def __init__(self, examples: Sequence[Seq2SeqExample], tokenizer, *, batch_size: int, max_source_length: int,
                 max_target_length: int, grad_acc: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1,
                 train: bool = True, pad_to_multiple_of: int | None = None, pack: bool = False,
                 pack_source_len: int | None = None, pack_target_len: int | None = None):
        if not examples:
            raise T5ForgeError("the fine-tuning data set is empty; check finetune.sni_dir / finetune.train_files")
        check_value("optim.batch_size", batch_size)
        check_value("optim.grad_acc", grad_acc)
        split_batch(batch_size, grad_acc, world_size)  # the Plan's rule and message: each slot gets an equal share
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.batch_size, self.grad_acc = batch_size, grad_acc
        self.rank, self.world_size = rank, world_size
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.seed, self.train, self.pad_to_multiple_of = seed, train, pad_to_multiple_of
        # Packed: the same examples per micro-batch, laid out several to a row (data/packing.py).
        self.pack = pack
        # Row capacities; a row is always at least as wide as the micro-batch's longest example.
        self.pack_source_len, self.pack_target_len = pack_source_len or None, pack_target_len or None
        self.epoch = 0
        self.position = 0  # micro-batches of this rank already yielded in `epoch`

    # ------------------------------------------------------------------ layout
    @property
    def num_slots(self) -> int:
        return self.world_size * self.grad_acc

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields per epoch (the same on every rank)."""
        return self.steps_per_epoch * self.grad_acc

    def order(self, epoch: int) -> np.ndarray:
        """Example indices of one epoch: a permutation drawn from (seed, epoch), or file order for evaluation."""
        n = len(self.examples)
        if not self.train:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def slot_indices(self, order: np.ndarray, position: int) -> tuple[list[int], int, int]:
        """(example indices, step, slot) of this rank's micro-batch number `position` in an epoch."""
        step, micro = divmod(position, self.grad_acc)
        slot = micro * self.world_size + self.rank
        chunk = order[step * self.batch_size : (step + 1) * self.batch_size]
        return chunk[slot :: self.num_slots].tolist(), step, slot

    # ------------------------------------------------------------------ batches
    def batch(self, epoch: int, position: int, order: np.ndarray | None = None) -> dict:
        """The micro-batch this rank yields at (epoch, position): a pure function of them."""
        order = self.order(epoch) if order is None else order
        indices, step, slot = self.slot_indices(order, position)
        filler = not indices
        if filler:
            indices = [int(order[step * self.batch_size])]
        # A string seed is hashed (sha512) by random.Random: stable across processes and Python runs.
        rng = random.Random(f"{self.seed}:{epoch}:{step}:{slot}") if self.train else None
        chosen = [self.examples[i] for i in indices]
        if self.pack:
            batch = collate_packed(
                chosen, self.tokenizer, self.max_source_length, self.max_target_length, self.pack_source_len,
                self.pack_target_len, pad_to_multiple_of=self.pad_to_multiple_of, rng=rng,
            )
        else:
            batch = collate_seq2seq(
                chosen, self.tokenizer, self.max_source_length, self.max_target_length,
                pad_to_multiple_of=self.pad_to_multiple_of, rng=rng,
            )
        if filler:
            batch["labels"].fill_(-100)  # no target token: no loss, no gradient, the rank still steps
        return batch

    def __iter__(self):
        order = self.order(self.epoch)
        while True:
            if self.position >= self.batches_per_epoch:
                if not self.train:
                    return
                self.epoch, self.position = self.epoch + 1, 0
                order = self.order(self.epoch)
            batch = self.batch(self.epoch, self.position, order)
            # Advance before handing the batch out: the state always names the next batch to yield.
            self.position += 1
            yield batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epochs_completed(self) -> int:
        return self.epoch + (self.position >= self.batches_per_epoch)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
            "num_examples": len(self.examples), "batch_size": self.batch_size, "grad_acc": self.grad_acc,
            "world_size": self.world_size, "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "epoch" not in state or "position" not in state:
            raise T5ForgeError(
                "the checkpoint's data.pt holds no fine-tuning loader state (was it written by `t5forge pretrain`?); "
                "start a new run, or fine-tune from it with model.checkpoint_path=CHECKPOINT"
            )
        if state.get("version", STATE_VERSION) > STATE_VERSION:
            raise T5ForgeError(f"fine-tuning loader state version {state['version']} is newer than this t5forge")
        names = {"num_examples": "examples", "batch_size": "optim.batch_size", "seed": "seed"}
        now = {"num_examples": len(self.examples), "batch_size": self.batch_size, "seed": self.seed}
        changed = [f"{names[k]} {state[k]} -> {v}" for k, v in now.items() if k in state and state[k] != v]
        if changed:
            raise T5ForgeError(
                f"the fine-tuning data or batching changed since the checkpoint ({', '.join(changed)}); "
                "the data position cannot be carried over: resume with the run's own config.yaml settings"
            )
        saved_acc = int(state.get("grad_acc", self.grad_acc))
        step, micro = divmod(int(state["position"]), saved_acc)
        if saved_acc == self.grad_acc and state.get("world_size", self.world_size) == self.world_size:
            self.epoch, self.position = int(state["epoch"]), int(state["position"])  # the same slots: exactly
            return
        if micro:
            raise T5ForgeError(
                f"the fine-tuning data position is {micro} micro-batch(es) into a step of optim.grad_acc={saved_acc}: "
                "it resumes only with the checkpoint's world size and optim.grad_acc"
            )
        self.epoch, self.position = int(state["epoch"]), step * self.grad_acc

    def load_rank_states(self, states: list[dict]) -> None:
        """Every rank's state of a checkpoint: at a step boundary, all at the same step of the epoch,
        whatever the world size and optim.grad_acc; re-dealt when they changed (the same examples per step)."""
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        self.load_state_dict({**states[0], "world_size": len(states)})
        saved = states[0]
        if self.rank == 0:
            import logging

            logging.getLogger(__name__).info(
                "resuming a %d-rank fine-tuning run on %d rank(s): data position re-dealt at step %d of epoch %d "
                "(the same examples per step, in other micro-batches)", len(states), self.world_size,
                int(saved["position"]) // int(saved.get("grad_acc", 1)), self.epoch)
