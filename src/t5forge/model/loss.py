"""The token loss: summed negative log-likelihood of the labels, from the decoder's hidden states.

The model returns hidden states (model/t5.py); the training step turns them into the loss it
normalises (train/loop.py: summed NLL / the step's target tokens + weighted auxiliary terms), and
held-out evaluation reports the same NLL per token. The chunked lm_head + cross-entropy that never
holds the logits is this module's speed twin (model/fast/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class TokenNLL(nn.Module):
    """sum over labels != -100 of -log softmax(h @ weight^T)[label], in fp32 (even for bf16 logits)."""

    def forward(self, h, weight, labels):  # h: (..., C); weight: (V, C); labels: (...) -> 0-d fp32
        logits = F.linear(h, weight)  # (..., V)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")


def sequence_nll(model, out, labels, loss: TokenNLL | None = None) -> torch.Tensor:
    """The summed token NLL of a T5 forward's output `out` (a Seq2SeqOutput) against `labels`."""
    return (loss or TokenNLL())(*model.output_projection(out.hidden), labels)


def seq2seq_loss(model, reduction: str = "mean", loss: TokenNLL | None = None, **batch) -> torch.Tensor:
    """The token NLL of `model(**batch)` against batch["labels"]: "mean" per target token or "sum".
    For scripts and tests; training normalises by the whole step's tokens instead (train/loop.py)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    labels = batch["labels"]
    total = sequence_nll(model, model(**batch), labels, loss)
    return total if reduction == "sum" else total / (labels != IGNORE_INDEX).sum()
