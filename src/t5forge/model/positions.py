"""Position schemes beside T5's learned relative bias ("t5_bias", model/t5.py): "alibi", "rope", "none".

Each is a position component (docs/architecture.md): built as `Class(config, is_decoder)`, one per
stack, called once per stack forward as `forward(q_len, k_len, offset) -> (1, H, Q, K)` fp32 additive
bias (or None: no bias), which the stack folds together with its padding / causal / packed-row mask
(model/masks.py). A scheme that rotates queries and keys instead (RoPE) also has
`rotation(length, offset) -> Rotation`, which the stack asks once per forward for the positions
[offset, offset + length) and hands to every block for its self-attention. Cross-attention has no
position in T5's design, whatever the scheme.

- "alibi", Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input
  Length Extrapolation": no parameters; head h adds -slope_h * distance to its scores. Causal
  (decoder): -slope_h * (q - k) for the past keys (the future ones are masked by the stack). The
  paper defines ALiBi for causal language models; the encoder's bidirectional form is the symmetric
  -slope_h * |k - q|. The slopes are the paper's geometric sequence 2^(-8 (h+1) / H).
- "rope", Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding": no bias;
  self-attention's q and k at position m are rotated by m * theta_i in the plane of each pair i of
  their d_kv features, theta_i = rope_theta^(-2i / d_kv) (the paper's 10000 by default), so that
  q_m . k_n depends on m - n only. The pairs are the half-split ones (feature i with i + d_kv/2, the
  `rotate_half` of GPT-NeoX and HF's LLaMA), not the paper's interleaved (2i, 2i+1): the same
  rotation on permuted features, which the q and k projections learn either way. All of d_kv is
  rotated (it must be even: T5Config says so). The angles and the rotation run in fp32 and the
  result is cast back to q's dtype. Encoder and decoder use the same rotation (causality is the
  stack's mask); cross-attention keeps no position, as RoPE relates two positions of one sequence.
  Keys in the generation cache are stored rotated at their absolute positions (the cache asks the
  attention's `project_kv` with the step's rotation), so cached decoding equals a full recompute;
  packed rows need nothing (an example is contiguous and RoPE is relative, so its absolute row
  positions give the same scores as positions from 0).
- "none": no position information at all (a bag of tokens up to the decoder's causal mask).

None has a weight, so T5.init_weights has nothing to do for them and HF's T5 cannot express
them (export refuses by config, model/hf.py). The speed twins' bias forms (fast/attention.py) read
T5's bucket table only; a stack with any of these schemes keeps the plain dense bias (fast.apply),
and the attention twin applies RoPE's rotation as the plain attention does.
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


class Rotation:
    """RoPE's rotation of positions [offset, offset + L): cos and sin of every angle, (L, D/2) fp32.
    Called on q or k (B, H, L, D): each half-split pair (x_i, x_{i+D/2}) turned by its angle,

        (x_i, x_{i+D/2}) -> (x_i cos a - x_{i+D/2} sin a,  x_{i+D/2} cos a + x_i sin a),

    computed in fp32 and returned in x's dtype."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 at least (a half q is widened; a float64 one, as in a gradient check, stays float64)
        x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # (B, H, L, D/2) each
        return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], -1).to(x.dtype)


class RoPE(nn.Module):
    """"rope": no bias; `rotation` turns self-attention's q and k by their positions (module docstring)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.d_kv, self.theta = config.d_kv, config.rope_theta  # d_kv even: T5Config checks
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # the device, as ALiBi's

    def forward(self, q_len: int, k_len: int, offset: int = 0):
        return None  # no additive bias: the rotation carries the positions

    def rotation(self, length: int, offset: int = 0) -> Rotation:
        device = self.anchor.device
        # theta_i = base^(-2i / D), i < D/2; the angle of position m is m * theta_i, each entry computed
        # alone, so a decoding step's angles are exactly the full sequence's at that position.
        inv_freq = self.theta ** (-torch.arange(0, self.d_kv, 2, device=device, dtype=torch.float32) / self.d_kv)
        positions = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq[None]  # (L, D/2)
        return Rotation(angles.cos(), angles.sin())


class NoPosition(nn.Module):
    """"none": no position bias; the stack's masks alone make the attention bias (or there is none)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()

    def forward(self, q_len: int, k_len: int, offset: int = 0):
        return None
