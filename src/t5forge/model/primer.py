"""Primer's multi-dconv-head attention (So et al. 2021, "Primer: Searching for Efficient
Transformers") as the block component "primer" (`model.block=primer`).

The plain pre-norm block whose self-attention (encoder and decoder; cross-attention stays plain) runs a
depthwise convolution of kernel 3 over the sequence after each of its Q, K and V projections, one
filter per channel of each head (H*D channels, groups = H*D), before the heads are split:

    decoder (causal):          q'[t] = w0 * q[t-2] + w1 * q[t-1] + w2 * q[t]
    encoder ("same" padding):  q'[t] = w0 * q[t-1] + w1 * q[t]   + w2 * q[t+1]

and likewise for k and v, each with its own weights (`q_dconv`, `k_dconv`, `v_dconv`, (H*D, 3), taps
in the order above); a neighbour outside the sequence is zero. There is no conv bias (T5 has none).
Full Primer is this block with the squared-ReLU feed-forward: `model.block=primer
model.feed_forward=squared_relu model.feed_forward_proj=relu`; the feed-forward stays selectable.

- Init: the identity (the tap on the position itself 1, the others 0: the last tap in the decoder,
  the centre in the encoder), so a fresh primer model computes what the pre-norm model with the same
  projections does and training moves it away. This is a choice made here, not the paper's init.
- Masks: a block sees padding and packed rows (segments) only through its self-attention bias (the
  block contract, docs/architecture.md), so the convolution reads them there: position t takes its
  neighbour t+j only where the attention bias lets query t attend to key t+j (not finfo.min). Hence
  no padding leaks into a real token (its padded neighbours count as zero, which is zeroing them
  before the convolution) and no token of one packed example reaches another's; at an example
  boundary the convolution sees zeros, as at the sequence's ends.
- Generation: with a `generation.LayerCache`, the decoder keeps the last 2 pre-convolution q/k/v rows
  in `cache.state["primer_dconv"]` (reordered with the cache in beam search) and caches the
  post-convolution keys/values (`append_self_kv`), so cached decoding equals a full recompute.
- Positions: with model.position=rope, q and k are rotated after the convolution (the rotation
  belongs to the attention scores), and the cache holds the keys convolved, then rotated.

The classes are subclasses of plain ones, so the speed converter (model/fast/) leaves them plain
(reference speed, dense bias: which the masks above read) and says so. HF's T5 has no Primer:
`t5forge export` refuses model.block=primer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t5forge.model.config import T5Config
from t5forge.model.t5 import Attention, PreNormBlock

CAUSAL_TAPS = (-2, -1, 0)  # the offsets each tap reads, in weight order
SAME_TAPS = (-1, 0, 1)
STATE = "primer_dconv"  # LayerCache.state key: (B, <=2, 3*H*D) pre-conv q|k|v of the last positions


def neighbour_keep(bias: torch.Tensor | None, j: int, q_len: int, past: int) -> torch.Tensor:
    """(B or 1, Q) bool: may query i read its neighbour at offset j? The key at i + j (in key
    coordinates, the queries being the last Q of the keys, `past` positions before them in the conv's
    input) must exist and be allowed by the additive attention `bias` (B or 1, H or 1, Q, K)."""
    k_len = bias.shape[-1] if bias is not None else past + q_len
    device = bias.device if bias is not None else None
    idx = torch.arange(q_len, device=device) + (k_len - q_len) + j  # (Q,) key index of each neighbour
    exists = (idx >= 0) & (idx < k_len) & (idx >= k_len - q_len - past)
    if bias is None:
        return exists[None]
    # (B or 1, Q, K): masks are the same for every head; a key-padding-only bias has Q = 1 (broadcast)
    rows = bias[:, 0].expand(bias.shape[0], q_len, k_len)
    seen = rows.gather(-1, idx.clamp(0, k_len - 1)[None, :, None].expand(rows.shape[0], q_len, 1))[..., 0]
    return exists & (seen > torch.finfo(bias.dtype).min / 2)


def dconv(x: torch.Tensor, weight: torch.Tensor, taps: tuple, keep: dict, past: torch.Tensor | None = None):
    """The depthwise convolution of x (B, Q, C) with weight (C, len(taps)): out[i] = sum over taps of
    weight[:, n] * x[i + taps[n]] * keep[taps[n]][i]; `past` (B, P, C): the inputs right before x
    (cached decoding), `keep`: offset -> (B or 1, Q) bool from `neighbour_keep` (offset 0 always)."""
    Q = x.shape[1]
    full = x if past is None else torch.cat([past, x], 1)
    P, lo, hi = full.shape[1] - Q, -min(taps), max(taps)
    full = F.pad(full, (0, 0, lo, hi))  # zeros outside: the masks say they are never read anyway
    w = weight.to(x.dtype)
    out = 0
    for n, j in enumerate(taps):
        s = full[:, lo + P + j: lo + P + j + Q]
        if j != 0:
            s = s * keep[j][..., None].to(s.dtype)
        out = out + s * w[:, n]
    return out  # (B, Q, C)


class PrimerAttention(Attention):
    """Self-attention with Primer's depthwise convolution after the q, k and v projections (see the
    module docstring); `causal` (decoder) reads t-2..t, else t-1..t+1."""

    def __init__(self, config: T5Config, causal: bool):
        super().__init__(config)
        self.causal, self.taps = causal, CAUSAL_TAPS if causal else SAME_TAPS
        inner = config.num_heads * config.d_kv
        # T5.init_weights sets them to the identity (PrimerBlock.init_weights); so does the constructor.
        self.q_dconv, self.k_dconv, self.v_dconv = (nn.Parameter(self.identity_taps(inner)) for _ in range(3))

    def identity_taps(self, channels: int) -> torch.Tensor:  # (C, 3): 1 on the tap reading t itself
        w = torch.zeros(channels, len(self.taps))
        w[:, self.taps.index(0)] = 1.0
        return w

    def forward(self, x, bias, context=None, kv=None, cache=None, rotation=None):
        # x: (B, Q, C); bias, rotation as Attention's; cache: the decoder layer's generation.LayerCache, if any
        if context is not None or kv is not None:
            raise ValueError("PrimerAttention is self-attention: it takes no context or kv (pass cache=)")
        B, Q, _ = x.shape
        inner = self.n_heads * self.d_kv
        qkv = torch.cat([self.q(x), self.k(x), self.v(x)], -1)  # (B, Q, 3 * H * D) pre-conv
        past = cache.state.get(STATE) if cache is not None else None
        P = 0 if past is None else past.shape[1]
        keep = {j: neighbour_keep(bias, j, Q, P) for j in self.taps if j != 0}
        weight = torch.cat([self.q_dconv, self.k_dconv, self.v_dconv], 0)  # (3 * H * D, 3)
        q, k, v = dconv(qkv, weight, self.taps, keep, past).split(inner, -1)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, H, Q, D)
        if rotation is not None:  # RoPE turns the convolved q and k: the positions are the attention's
            q, k = rotation(q), rotation(k)
        if cache is not None:
            cache.state[STATE] = (qkv if past is None else torch.cat([past, qkv], 1))[:, -(len(self.taps) - 1):]
            k, v = cache.append_self_kv(k, v)  # post-conv (post-rotation) keys/values of all positions so far
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)  # (B, H, Q, D)
        return self.o(y.transpose(1, 2).reshape(B, Q, inner))


class PrimerBlock(PreNormBlock):
    """"primer": the pre-norm block with PrimerAttention as its self-attention (module docstring)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__(config, is_decoder)
        # Replaces the plain self-attention under the same name: parameter names stay T5's plus the convs.
        self.attn = PrimerAttention(config, causal=is_decoder)

    @torch.no_grad()
    def init_weights(self):
        """The convolutions start at the identity. T5.init_weights calls this for the block and still
        visits the attention afterwards with T5's rule for q, k, v, o, which never touches the convs."""
        for p in (self.attn.q_dconv, self.attn.k_dconv, self.attn.v_dconv):
            p.copy_(self.attn.identity_taps(p.shape[0]))

    def forward(self, x, self_bias, enc=None, cross_bias=None, cache=None, rotation=None):
        # as PreNormBlock.forward: x (B, L, C); enc (B, S, C); cache: a generation.LayerCache when decoding
        x = x + self.dropout(self.attn(self.attn_norm(x), self_bias, cache=cache, rotation=rotation))
        if self.is_decoder:
            kv = cache.cross_kv(self.cross_attn, enc) if cache is not None else None
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_bias, context=enc, kv=kv))
        return x + self.dropout(self.ff(self.ff_norm(x)))
