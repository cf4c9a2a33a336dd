"""What the model returns: decoder hidden states, encoder states, and the auxiliary losses its
components produced in that forward (the token loss is model/loss.py's, combined in train/loop.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AuxLoss(NamedTuple):
    """An auxiliary training loss a module produced (e.g. a router's load balance): the step adds
    weight * term to the token loss."""

    term: torch.Tensor  # 0-d
    weight: float


class Seq2SeqOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C) decoder output; model.logits(hidden) gives (B, T, V)
    encoder_hidden_states: torch.Tensor  # (B, S, C)
    aux_losses: dict  # name -> AuxLoss, summed over the modules that report it


def collect_aux_losses(model: nn.Module) -> dict:
    """Every module's `aux_losses` of this forward (a module sets it in its forward), summed by name;
    each module's dict is emptied, so a term is counted by one forward only."""
    total: dict[str, AuxLoss] = {}
    for module in model.modules():
        # A plain attribute lives in the instance __dict__; reading it there skips nn.Module's
        # __getattr__, which raises (and is caught) for every module without one, every forward.
        terms = module.__dict__.get("aux_losses")
        if not terms:
            continue
        for name, aux in terms.items():
            total[name] = AuxLoss(total[name].term + aux.term, aux.weight) if name in total else aux
        module.aux_losses = {}
    return total
