"""Held-out negative log-likelihood and next-token accuracy over a fixed set of batches."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from t5forge.distributed import World, all_reduce_sum, any_rank, is_fsdp
from t5forge.model.load import unwrap


@torch.no_grad()
def evaluate_loss(model, batches, device, autocast=contextlib.nullcontext, world: World = World()) -> dict:
    """Token-weighted NLL (nats/token: the token loss alone, no auxiliary terms) and argmax accuracy
    over the target tokens of `batches`.

    Sums are taken over tokens, not averaged per batch, so batches with different numbers of
    target tokens count by their size. `eval_batches` is the number of batches scored, summed over
    the processes.
    """
    was_training = model.training
    core = unwrap(model)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll, correct, tokens, batches
    for batch in _in_step(batches, world, sharded=world.distributed and is_fsdp(core)):
        if batch is None:  # sharded weights: this rank's batches are done, another rank's are not
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                  labels=torch.zeros(1, 1, dtype=torch.long, device=device))
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            logits = core.logits(model(**batch).hidden)  # (B, T, V); auxiliary losses are not scored
        labels = batch["labels"]
        valid = labels != -100
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        correct = ((logits.argmax(-1) == labels) & valid).sum()
        totals += torch.stack([nll.double(), correct.double(), valid.sum().double(), totals.new_ones(())])
    model.train(was_training)
    nll, correct, tokens, batches = all_reduce_sum(totals, world).tolist()
    if tokens == 0:
        return {"eval_loss": math.nan, "eval_accuracy": math.nan, "eval_tokens": 0, "eval_batches": int(batches)}
    return {"eval_loss": nll / tokens, "eval_accuracy": correct / tokens, "eval_tokens": int(tokens),
            "eval_batches": int(batches)}


def _in_step(batches, world: World, sharded: bool):
    """`batches`; with sharded weights (FSDP), every rank runs a forward (its weights' all-gathers)
    as often as the rank with the most batches: a rank out of batches gets None (a forward whose
    result is dropped) until every rank is out."""
    if not sharded:
        yield from batches
        return
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not any_rank(batch is not None, world):
            return
        yield batch
