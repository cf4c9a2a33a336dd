"""The attention twin: the plain attention with its faster kernels, and the bias forms they read.

T5 attention is softmax(q k^T + position_bias + mask) v with NO 1/sqrt(d) scaling. The plain stack
hands every layer one dense additive bias (B|1, H, Q, K); the stack twin (fast/stack.py) hands the
attention twins an `AttentionBias` instead, prepared once per stack in the form their kernel reads
(`stack_biases`). A twin given a plain dense tensor treats it as the "sdpa" form.

- sdpa (`T5Config.attention_backend`): the dense bias through F.scaled_dot_product_attention. On
  CPU, while the bias is being trained, torch's fused CPU kernel cannot return the bias gradient
  and SDPA falls back to its unfused math path; `_BiasedAttention` below does the same math with
  fewer passes over memory (one batch row at a time, in place).
- sdpa with packed rows on CPU: example by example (fast/spans.py), where that costs less than a
  dense block-diagonal mask.
- sdpa with long inputs (queries x keys above fast/blocked.py's BLOCKED_ABOVE_CELLS): by blocks of
  queries (fast/blocked.py), with no (B, H, Q, K) tensor at all; padded or packed rows alike.
- flex: FlexAttention (fast/flex.py): the table read by bucket in a score_mod and a block mask;
  a generation cache (one query per step) takes the dense sdpa form.
- eager: no twin at all; the plain module runs (the reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from t5forge.errors import T5ForgeError
from t5forge.model.fast.blocked import QueryBlocks, band, block_size, blocked_attention, plan_blocks, use_blocks
from t5forge.model.fast.feed_forward import fused_linear
from t5forge.model.fast.flex import flex_attention, flex_bias
from t5forge.model.fast.spans import _span_attention_autograd, _SpanAttention, cheaper_as_spans, segment_spans, use_spans
from t5forge.model.masks import additive_bias, compute_dtype, keep_mask
from t5forge.model.t5 import Attention, Stack


@dataclass
class AttentionBias:
    """What every layer of one stack adds to its attention scores, in its kernel's form."""

    backend: str  # "sdpa" or "flex"
    dense: torch.Tensor | None = None  # sdpa: (B or 1, H, Q, K) additive float bias, or None
    spans: list | None = None  # sdpa on CPU, packed rows: segment_spans(); `dense` is then (1, H, Q, K)
    # for the longest example, each example reading its top-left corner
    score_mod: Callable | None = None  # flex: adds the relative position bias
    block_mask: Any = None  # flex: padding / causal / packed-row mask (a BlockMask), or None
    blocks: QueryBlocks | None = None  # sdpa, long inputs: attention by blocks of queries (fast/blocked.py)


class FastAttention(Attention):
    """The plain attention with q, k, v (or k, v) from one matmul under autocast and `attend`'s kernels."""

    def project_kv(self, x, rotation=None):  # (B, K, C) -> k, v: (B, H, K, D); the generation cache calls this
        k, v = fused_linear(x, self.k, self.v)
        k, v = self.split_heads(k), self.split_heads(v)
        return (k if rotation is None else rotation(k)), v

    def forward(self, x, bias, context=None, kv=None, rotation=None):
        # x: (B, Q, C); bias: an AttentionBias (the stack twin) or a dense tensor / None (a plain stack);
        # rotation: as the plain attention's (RoPE), applied the same way to q and k
        B, Q, _ = x.shape
        if context is None and kv is None:  # self-attention: q, k and v from one matmul
            q, k, v = (self.split_heads(t) for t in fused_linear(x, self.q, self.k, self.v))
            if rotation is not None:
                k = rotation(k)
        else:
            q = self.split_heads(self.q(x))  # (B, H, Q, D)
            k, v = kv if kv is not None else self.project_kv(context, rotation)
        if rotation is not None:
            q = rotation(q)
        if not isinstance(bias, AttentionBias):
            bias = AttentionBias("sdpa", dense=bias)
        y = attend(q, k, v, bias, self.dropout if self.training else 0.0)  # (B, H, Q, D)
        return self.o(y.transpose(1, 2).reshape(B, Q, self.n_heads * self.d_kv))


def attend(q, k, v, bias: AttentionBias, dropout_p: float = 0.0) -> torch.Tensor:
    # q: (B, H, Q, D); k, v: (B, H, K, D) -> (B, H, Q, D)
    mask = bias.dense
    if bias.blocks is not None:
        return blocked_attention(q, k, v, bias.blocks, dropout_p)
    if bias.spans is not None:
        if torch.is_grad_enabled() and dropout_p == 0.0:
            return _SpanAttention.apply(q, k, v, mask, bias.spans)
        return _span_attention_autograd(q, k, v, mask, bias.spans, dropout_p)
    if bias.backend == "sdpa":
        if (mask is not None and mask.requires_grad and torch.is_grad_enabled() and q.device.type == "cpu"
                and dropout_p == 0.0):
            return _BiasedAttention.apply(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
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
        return flex_attention(q.device)(q, k, v, score_mod=bias.score_mod, block_mask=bias.block_mask, scale=1.0)
    raise ValueError(f"unknown attention bias form {bias.backend!r}")


def stack_biases(stack, x, mask, enc, enc_mask, offset, segments, enc_segments, decoding: bool):
    """(self_bias, cross_bias) AttentionBias forms of one stack's forward, for attention twins.
    Arguments as the plain `Stack.attention_biases`; decoding: a generation cache is in use.
    `stack.position` is a plain T5RelativeBias (fast.apply checks)."""
    L = x.shape[1]
    backend = stack.config.attention_backend
    if backend == "flex" and not decoding:  # (one query per step: a block mask per step would cost more than it saves)
        position = stack.position
        # the buckets by distance (2L - 1 of them), not (L, L): linear in the length
        by_distance = position.buckets(1, L + offset + L - 1, L - 1 + offset)[0]
        score_mod, block_mask = flex_bias(L, offset + L, position.weight, by_distance, mask,
                                          stack.is_decoder and L > 1, offset, segments, segments)
        self_bias, cross_bias = AttentionBias("flex", score_mod=score_mod, block_mask=block_mask), None
        if stack.is_decoder:
            _, block_mask = flex_bias(L, enc.shape[1], key_padding_mask=enc_mask, query_segments=segments,
                                      key_segments=enc_segments)
            cross_bias = AttentionBias("flex", block_mask=block_mask)
        return self_bias, cross_bias
    dtype = compute_dtype(x)
    if not decoding and use_blocks(L, L) and not torch.compiler.is_compiling():
        return long_biases(stack, x, mask, enc, enc_mask, segments, enc_segments, dtype)
    by_example = segments is not None and use_spans("sdpa", x.device)
    self_spans = cheaper_as_spans(segment_spans(segments, segments), *segments.shape, L) if by_example else None
    cross_spans = None
    if by_example and stack.is_decoder:
        cross_spans = cheaper_as_spans(segment_spans(segments, enc_segments), *segments.shape, enc.shape[1])
    dense_self, dense_cross = None, None
    if self_spans is None or (stack.is_decoder and cross_spans is None):
        dense_self, dense_cross = Stack.attention_biases(stack, x, mask, enc, enc_mask, offset, segments, enc_segments)
    if self_spans is not None:  # a bias as large as the longest example only, each span reading its corner
        n = max((q1 - q0 for _, q0, q1, _, _ in self_spans), default=1)
        keep = keep_mask(n, n, x.device, causal=stack.is_decoder and n > 1)
        self_bias = AttentionBias("sdpa", dense=additive_bias(stack.position(n, n), keep, dtype), spans=self_spans)
    else:
        self_bias = AttentionBias("sdpa", dense=dense_self)
    cross_bias = None
    if stack.is_decoder:
        if cross_spans is not None:
            cross_bias = AttentionBias("sdpa", spans=cross_spans)
        else:
            cross_bias = AttentionBias("sdpa", dense=dense_cross)
    return self_bias, cross_bias


def long_biases(stack, x, mask, enc, enc_mask, segments, enc_segments, dtype):
    """stack_biases for long inputs: the self-attention by blocks of queries, reading one band of the
    position bias; the cross-attention too where it is long, else its small (B, 1, 1 or T, S) mask."""
    B, L = x.shape[:2]
    heads, n = stack.config.num_heads, block_size(stack.config.num_heads, L)
    self_bias = AttentionBias("sdpa", blocks=QueryBlocks(
        band(stack.position, L, L, n, dtype), L, L,
        plan_blocks(B, L, L, n, mask, stack.is_decoder, segments, segments),
        key_keep=None if mask is None else mask.bool(), query_segments=segments, key_segments=segments,
        causal=stack.is_decoder))
    if not stack.is_decoder:
        return self_bias, None
    S = enc.shape[1]
    if use_blocks(L, S):
        n = block_size(heads, S)
        return self_bias, AttentionBias("sdpa", blocks=QueryBlocks(
            None, L, S, plan_blocks(B, L, S, n, enc_mask, False, segments, enc_segments),
            key_keep=None if enc_mask is None else enc_mask.bool(), query_segments=segments,
            key_segments=enc_segments))
    keep = keep_mask(L, S, x.device, enc_mask, query_segments=segments, key_segments=enc_segments)
    return self_bias, AttentionBias("sdpa", dense=additive_bias(None, keep, dtype))


class _BiasedAttention(torch.autograd.Function):
    """softmax(q k^T + bias) v with the bias gradient, one batch row at a time: a row's (H, Q, K)
    scores (4-6 MB at the benchmark shapes) stay in cache from q k^T through the softmax to the
    product with v, and likewise dP, dS and the bias gradient in the backward pass; only the
    probabilities go to memory, as the backward pass needs them. The softmax backward uses
    rowsum(dP * P) = rowsum(dout * out), a reduction over D instead of K. Against SDPA's math path
    (whole-batch scores, several passes): benchmarks/performance.md."""

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
        # and a matmul writing into such a strided row runs markedly slower on CPU; the one copy
        # back to (B, L, H*D) in the projections' backward costs less.
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
