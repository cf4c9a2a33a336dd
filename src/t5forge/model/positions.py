"""Position schemes beside T5's learned relative bias ("t5_bias", model/t5.py): "alibi" and "none".

Each is a position component (docs/architecture.md): built as `Class(config, is_decoder)`, one per
stack, called once per stack forward as `forward(q_len, k_len, offset) -> (1, H, Q, K)` fp32 additive
bias (or None: no bias), which the stack folds together with its padding / causal / packed-row mask
(model/masks.py). Cross-attention has no position bias in T5's design, whatever the scheme.

- "alibi", Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
  Length Extrapolation": no parameters; head h adds -slope_h * distance to its scores. Causal
  (decoder): -slope_h * (q - k) for the past keys (the future ones are masked by the stack). The
  paper defines ALiBi for causal language models; the encoder's bidirectional form is the symmetric
  -slope_h * |k - q|. The slopes are the paper's geometric sequence 2^(-8 (h+1) / H).
- "none": no position information at all (a bag of tokens up to the decoder's causal mask).

Neither has a weight, so T5.init_weights has nothing to do for them and HF's T5 cannot express
them (export refuses by config, model/hf.py). The speed twins' bias forms (fast/attention.py) read
T5's bucket table only; a stack with either scheme keeps the plain dense bias (fast.apply).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from t5forge.model.config import T5Config


def alibi_slopes(n_heads: int) -> list[float]:
    """The paper's slopes: 2^(-8 (h+1) / H) for H a power of two; otherwise those of the power of two
    just below H, followed by every other slope of twice that power, up to H heads (the rule of the
    authors' code, github.com/ofirpress/attention_with_linear_biases)."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_two(n_heads)
    below = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(below) + power_of_two(2 * below)[0::2][: n_heads - below]


class ALiBi(nn.Module):
    """"alibi": bias[h, q, k] = -slope_h * |k - q| (encoder), -slope_h * (q - k) for past keys (decoder)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.causal = is_decoder
        self.slopes = tuple(alibi_slopes(config.num_heads))  # Python floats: a model cast to bf16 keeps them exact
        # No weight tells the module where the model lives; this empty buffer moves with it (and is
        # not saved, so checkpoints hold exactly T5's other weights).
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def forward(self, q_len: int, k_len: int, offset: int = 0):  # -> (1, H, Q, K) fp32
        device = self.anchor.device
        q_pos = torch.arange(q_len, device=device)[:, None] + offset
        relative = torch.arange(k_len, device=device)[None, :] - q_pos  # key - query, (Q, K)
        # Causal: the distance back to a past key; future keys get 0 here and the stack's causal mask.
        distance = -relative.clamp(max=0) if self.causal else relative.abs()
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=device)
        return (-slopes[:, None, None] * distance.float())[None]


class NoPosition(nn.Module):
    """"none": no position bias; the stack's masks alone make the attention bias (or there is none)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()

    def forward(self, q_len: int, k_len: int, offset: int = 0):
        return None
