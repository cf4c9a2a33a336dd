"""Attention back ends behind one switch (`T5Config.attention_backend`): "eager", "sdpa", "flex".

T5 attention is softmax(q k^T + position_bias + mask) v with NO 1/sqrt(d) scaling (it is folded
into the initialisation of q). The position bias is a learned table (num_buckets, H) per stack,
read at the relative-position bucket of every (query, key) pair. Two calls, so that a back end
prepares its form of the bias once per stack and every layer reuses it:

    bias = make_attention_bias(backend, q_len, k_len, table, buckets, key_padding_mask, causal)  # per stack
    y = attend(q, k, v, bias, dropout_p)                                                          # per layer

- eager: the reference. One dense additive float mask (B or 1, H, Q, K): the position bias with
  the padding / causal mask folded in as large negative numbers; matmul, fp32 softmax, matmul.
- sdpa: the same dense mask through F.scaled_dot_product_attention. One exception: on CPU, while
  the bias is being trained, torch's fused CPU kernel cannot return the mask's gradient, so SDPA
  falls back to its unfused math path; `_BiasedAttention` below does the same math with fewer
  passes over memory (one batch row at a time, in place) and takes 30-40% less time per layer
  (forward + backward, encoder self-attention at the tiny and t5-v1.1-small benchmark shapes).
- flex: FlexAttention (GPU). No dense bias at all: a score_mod adds table[buckets[q, k], h] inside
  the kernel, and padding / causality become a block mask, so fully masked key blocks are skipped.
  Gradients reach the table through the score_mod. Compiled on CUDA; on CPU torch runs its forward
  unfused (for tests) and refuses its backward. No attention dropout.

Packed rows (several examples per row, `query_segments` / `key_segments`) add a block-diagonal
mask: dense (B, H, Q, K) for eager / sdpa; for flex part of the block mask, so the blocks between
different examples are skipped rather than masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from t5forge.errors import T5ForgeError

BACKENDS = ("eager", "sdpa", "flex")


@dataclass
class AttentionBias:
    """What every layer of one stack adds to its attention scores, in its back end's form."""

    backend: str
    dense: torch.Tensor | None = None  # eager / sdpa: (B or 1, H, Q, K) additive float mask, or None
    score_mod: Callable | None = None  # flex: adds the relative position bias
    block_mask: Any = None  # flex: padding / causal mask (a BlockMask), or None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype when autocast is on, else the tensor's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def make_attention_bias(
    backend: str,
    q_len: int,
    k_len: int,
    table: torch.Tensor | None = None,  # (num_buckets, H) learned bias, or None (cross-attention)
    buckets: torch.Tensor | None = None,  # (Q, K) long: bucket of every (query, key) pair
    key_padding_mask: torch.Tensor | None = None,  # (B, K), 1/True = attend, 0/False = padding
    causal: bool = False,
    query_offset: int = 0,  # position of the first query (decoding with a cache)
    dtype: torch.dtype = torch.float32,  # the dtype q/k/v will have
    query_segments: torch.Tensor | None = None,  # (B, Q) packed rows: example number, 0 = padding
    key_segments: torch.Tensor | None = None,  # (B, K); with both, a query sees only its own example
) -> AttentionBias:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}")
    if (query_segments is None) != (key_segments is None):
        raise ValueError("query_segments and key_segments go together")
    if backend == "flex":
        return _flex_bias(q_len, k_len, table, buckets, key_padding_mask, causal, query_offset,
                          query_segments, key_segments)
    # Contiguous once here: every layer reads this bias, and a strided one is ~5x slower to add.
    bias = None if table is None else F.embedding(buckets, table).permute(2, 0, 1).float().contiguous()[None]
    # finfo.min rather than -inf: a fully masked row then gives a uniform softmax instead of NaN.
    # sdpa gets the mask in q's dtype, so the minimum of that dtype (fp32's overflows to -inf in
    # bf16 / fp16); eager keeps the bias in fp32 and promotes the scores to fp32 for the softmax.
    neg = torch.finfo(dtype if backend == "sdpa" else torch.float32).min
    if causal:
        assert bias is not None, "causal attention comes with a position bias in T5"
        q_pos = torch.arange(q_len, device=bias.device)[:, None] + query_offset
        k_pos = torch.arange(k_len, device=bias.device)[None, :]
        bias = bias.masked_fill(k_pos > q_pos, neg)  # (1, H, Q, K)
    if key_padding_mask is not None:
        pad = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, K)
        if bias is None:
            bias = torch.zeros(pad.shape, dtype=torch.float32, device=pad.device)
        bias = bias.masked_fill(pad, neg)  # (B, H, Q, K) or (B, 1, 1, K)
    if query_segments is not None:
        # Packed rows: block-diagonal, each query attends to the keys of its own example only
        # (padding keys, segment 0, to none). Dense, so (B, H, Q, K) with a position bias.
        if bias is None:
            bias = torch.zeros((), dtype=torch.float32, device=query_segments.device)
        bias = bias.masked_fill(~_same_segment(query_segments, key_segments)[:, None], neg)
    if bias is not None and backend == "sdpa":
        # Converted once here rather than in every layer. (Not clamp(min=finfo.min) instead of the
        # dtype-aware fill above: that clamp makes torch 2.13's inductor corrupt the heap in the
        # backward pass on CPU under torch.compile.)
        bias = bias.to(dtype)
    return AttentionBias(backend, dense=bias)


def attend(
    q: torch.Tensor,  # (B, H, Q, D)
    k: torch.Tensor,  # (B, H, K, D)
    v: torch.Tensor,  # (B, H, K, D)
    bias: AttentionBias,  # from make_attention_bias
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, Q, D)
    mask = bias.dense
    if bias.backend == "sdpa":
        if (mask is not None and mask.requires_grad and torch.is_grad_enabled() and q.device.type == "cpu"
                and dropout_p == 0.0):
            return _BiasedAttention.apply(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    if bias.backend == "eager":
        scores = q @ k.transpose(-2, -1)  # (B, H, Q, K), no 1/sqrt(D): T5 does not scale
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        return probs @ v
    if bias.backend == "flex":
        if dropout_p > 0.0:
            raise T5ForgeError(
                "attention back end 'flex' has no attention dropout; set model.dropout_rate=0 "
                "(nanoT5's pre-training value) or use model.attention=sdpa"
            )
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise T5ForgeError(
                "attention back end 'flex' trains only on a GPU (torch's FlexAttention has no CPU backward); "
                "use model.attention=sdpa on CPU"
            )
        return _flex_attention(q.device)(q, k, v, score_mod=bias.score_mod, block_mask=bias.block_mask, scale=1.0)
    raise ValueError(f"unknown attention backend {bias.backend!r}")


class _BiasedAttention(torch.autograd.Function):
    """softmax(q k^T + bias) v with the bias gradient, one batch row at a time: a row's (H, Q, K)
    scores (4-6 MB at the benchmark shapes) stay in cache from q k^T through the softmax to the
    product with v, and likewise dP, dS and the bias gradient in the backward pass; only the
    probabilities go to memory, as the backward pass needs them. The softmax backward uses
    rowsum(dP * P) = rowsum(dout * out), a reduction over D instead of K.
    Against SDPA's math path (whole-batch scores, several passes): 30-40% less time per layer."""

    @staticmethod
    def forward(ctx, q, k, v, bias):  # q: (B, H, Q, D); k, v: (B, H, K, D); bias: (B or 1, H, Q, K)
        probs = q.new_empty(q.shape[:-1] + k.shape[-2:-1])  # (B, H, Q, K)
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])  # (B, H, Q, D)
        scores = probs.new_empty(probs.shape[1:])  # one row's buffer, reused: no fresh pages per row
        for b in range(q.shape[0]):
            torch.matmul(q[b], k[b].transpose(-2, -1), out=scores)  # (H, Q, K)
            scores += bias[b if bias.shape[0] > 1 else 0]
            torch.softmax(scores, dim=-1, out=probs[b])
            torch.matmul(probs[b], v[b], out=out[b])
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs, out = ctx.saved_tensors
        # Contiguous (B, H, L, D), not empty_like: q, k, v are head views of (B, L, H*D) projections,
        # and a matmul writing into such a strided row runs at ~60% speed (measured on CPU); the
        # one copy back to (B, L, H*D) in the projections' backward costs less.
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        dbias = probs.new_zeros(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        delta = (dout * out).sum(-1, keepdim=True)  # (B, H, Q, 1) = rowsum(dP * P)
        dscores = probs.new_empty(probs.shape[1:])
        for b in range(q.shape[0]):
            torch.matmul(probs[b].transpose(-2, -1), dout[b], out=dv[b])
            torch.matmul(dout[b], v[b].transpose(-2, -1), out=dscores)  # dP, turned into dS = P * (dP - delta) in place
            dscores.sub_(delta[b]).mul_(probs[b])
            torch.matmul(dscores, k[b], out=dq[b])
            torch.matmul(dscores.transpose(-2, -1), q[b], out=dk[b])
            if dbias is not None:  # a bias shared by the batch (leading dim 1) sums over rows
                row = dbias[b if dbias.shape[0] > 1 else 0]
                row += dscores.sum_to_size(row.shape)
        return dq, dk, dv, dbias


def _same_segment(query_segments, key_segments):  # (B, Q), (B, K) -> (B, Q, K) bool
    return (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] != 0)


# ------------------------------------------------------------------ FlexAttention
_COMPILED_FLEX = None


def _flex_attention(device: torch.device):
    """flex_attention, compiled on GPU (its fused kernel); eager elsewhere (unfused, forward only)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex_bias(q_len, k_len, table, buckets, key_padding_mask, causal, query_offset, query_segments,
               key_segments) -> AttentionBias:
    from torch.nn.attention.flex_attention import create_block_mask

    score_mod = None
    if table is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[buckets[q_idx, kv_idx], h].to(score.dtype)

    rules = []  # mask_mod predicates; a key is kept when all of them hold
    if key_padding_mask is not None:
        pad = key_padding_mask.bool()
        rules.append(lambda b, h, q_idx, kv_idx: pad[b, kv_idx])
    if query_segments is not None:  # packed rows: whole off-diagonal blocks are skipped, not computed
        rules.append(lambda b, h, q_idx, kv_idx: (query_segments[b, q_idx] == key_segments[b, kv_idx])
                     & (key_segments[b, kv_idx] != 0))
    if causal:
        rules.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + query_offset)

    def keep(b, h, q_idx, kv_idx):
        kept = rules[0](b, h, q_idx, kv_idx)
        for rule in rules[1:]:
            kept = kept & rule(b, h, q_idx, kv_idx)
        return kept

    block_mask = None
    if rules:
        rows = key_padding_mask if key_padding_mask is not None else key_segments
        device = (table if table is not None else rows).device
        batch = None if rows is None else rows.shape[0]
        block_mask = create_block_mask(keep, batch, None, q_len, k_len, device=device)
    return AttentionBias("flex", score_mod=score_mod, block_mask=block_mask)
