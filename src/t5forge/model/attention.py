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
mask: dense (B, H, Q, K) for eager and for sdpa on GPU; for flex part of the block mask, so the
blocks between different examples are skipped rather than masked. sdpa on CPU goes one step
further (`segment_spans`, `_SpanAttention`): each example attends over its own slice of the row,
so attention costs sum(length^2) over the examples whatever the row width, and a micro-batch can
be packed into one row with no padding to speak of. T5's bias depends only on key - query, so
every example reads the top-left corner of one (H, longest, longest) bias. Each attention of a
stack takes whichever layout costs less (`cheaper_as_spans`): SNI's long prompts go by example,
its few-token targets as one short dense row.
"""

from __future__ import annotations

import functools
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
    spans: list | None = None  # sdpa on CPU, packed rows: segment_spans(); `dense` is then (1, H, Q, K)
    # for the longest example, each example reading its top-left corner
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
    spans: list | None = None,  # instead of segments: segment_spans(); q_len / k_len the longest span's
) -> AttentionBias:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}")
    if (query_segments is None) != (key_segments is None):
        raise ValueError("query_segments and key_segments go together")
    if spans is not None and (backend != "sdpa" or query_segments is not None or key_padding_mask is not None):
        raise ValueError("spans are sdpa's form of packed rows: no segments or padding mask with them")
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
    return AttentionBias(backend, dense=bias, spans=spans)


def segment_spans(query_segments: torch.Tensor, key_segments: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(row, q_start, q_end, k_start, k_end) of every example of packed rows: the queries of segment
    s in a row and the keys of the same segment in the same row (self-attention: the same slice;
    cross-attention: the example's source). Padding (0) and a segment with no keys get no span."""
    spans = []
    for b, (q_row, k_row) in enumerate(zip(query_segments.tolist(), key_segments.tolist())):
        keys = _runs(k_row)
        for segment, (q0, q1) in _runs(q_row).items():
            if segment and segment in keys:
                spans.append((b, q0, q1, *keys[segment]))
    return spans


# One span's fixed cost (a dozen small calls forward and backward, ~0.2 ms on CPU) in units of
# score cells (query x key pairs, all heads): what a dense mask computes in that time. Measured on a
# 2-core Xeon at t5-v1.1-small; only its order of magnitude matters.
SPAN_OVERHEAD_CELLS = 4096


def cheaper_as_spans(spans: list, rows: int, q_len: int, k_len: int) -> list | None:
    """`spans` if attending example by example costs less than a dense block-diagonal mask over the
    (rows, q_len, k_len) score cells, else None. Wide encoder rows: spans by far; a short decoder row
    of many few-token targets: the dense mask (the spans would each cost more in calls than in work)."""
    cells = sum((q1 - q0) * (k1 - k0) for _, q0, q1, k0, k1 in spans)
    return spans if cells + SPAN_OVERHEAD_CELLS * len(spans) < rows * q_len * k_len else None


def use_spans(backend: str, device: torch.device) -> bool:
    """Whether packed rows go to attend() as spans rather than a dense block-diagonal mask: sdpa on
    CPU, outside torch.compile (the spans are read on the host, a graph break per stack)."""
    return backend == "sdpa" and device.type == "cpu" and not torch.compiler.is_compiling()


def _runs(row: list[int]) -> dict[int, tuple[int, int]]:  # segment -> (start, end) of its contiguous run
    runs, start = {}, 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            if row[start] in runs and row[start] != 0:
                raise ValueError(f"segment {row[start]} is not contiguous in its packed row: an example's "
                                 "tokens must be side by side (data/packing.py lays them out so)")
            runs[row[start]] = (start, i)
            start = i
    return runs


def attend(
    q: torch.Tensor,  # (B, H, Q, D)
    k: torch.Tensor,  # (B, H, K, D)
    v: torch.Tensor,  # (B, H, K, D)
    bias: AttentionBias,  # from make_attention_bias
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, Q, D)
    mask = bias.dense
    if bias.spans is not None:
        if torch.is_grad_enabled() and dropout_p == 0.0:
            return _SpanAttention.apply(q, k, v, mask, bias.spans)
        return _span_attention_autograd(q, k, v, mask, bias.spans, dropout_p)
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


class _SpanAttention(torch.autograd.Function):
    """Attention within each example of packed rows, one span at a time: softmax(q k^T + bias) v over
    the example's own queries and keys, as _BiasedAttention does for a whole row. Only the spans'
    (H, lq, lk) probabilities are kept for the backward pass. `bias` (1, H, Q, K) is shared: every
    span adds its top-left (lq, lk) corner and the bias gradient sums there. Queries outside every
    span (padding) get 0; a key is in at most one span, so dk / dv slices never overlap.

    The output and dq / dk / dv are (B, L, H, D) buffers handed out as (B, H, L, D) views: the
    projections around attention read and write (B, L, H*D), so no copy is left at either end, and
    each span's product is computed fresh and then copied into its slice (bmm into a strided `out`
    was slower than that). On CPU at the t5-v1.1-small shape, 16 SNI examples in one row attend in
    ~45% of the time their padded batch's dense attention takes (forward + backward, encoder)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, spans):  # q: (B, H, Q, D); k, v: (B, H, K, D)
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])  # (B, Q, H, D)
        probs = []
        for b, q0, q1, k0, k1 in spans:
            q_span, k_t = q[b, :, q0:q1], k[b, :, k0:k1].transpose(-2, -1)
            if bias is None:
                scores = torch.bmm(q_span, k_t)  # (H, lq, lk)
            else:  # scores = bias corner + q k^T in one call
                scores = torch.baddbmm(bias[0, :, : q1 - q0, : k1 - k0], q_span, k_t)
            p = torch.softmax(scores, dim=-1)  # (out=scores would copy through a temporary: slower)
            out[b, q0:q1] = torch.bmm(p, v[b, :, k0:k1]).transpose(0, 1)
            probs.append(p)
        out = out.transpose(1, 2)
        _zero_outside(out, [(b, q0, q1) for b, q0, q1, _, _ in spans])
        # The probabilities too (intermediates may be saved): autograd frees them after the backward.
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.spans, ctx.bias_meta = spans, None if bias is None else (bias.shape, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *probs = ctx.saved_tensors
        dq, dk, dv = (t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]) for t in (q, k, v))  # (B, L, H, D)
        dbias = None
        if ctx.bias_meta is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=q.device)
        neg_delta = (dout * out).sum(-1, keepdim=True).neg_()  # (B, H, Q, 1) = -rowsum(dP * P)
        for (b, q0, q1, k0, k1), p in zip(ctx.spans, probs):
            d = dout[b, :, q0:q1]
            dv[b, k0:k1] = torch.bmm(p.transpose(-2, -1), d).transpose(0, 1)
            ds = torch.baddbmm(neg_delta[b, :, q0:q1], d, v[b, :, k0:k1].transpose(-2, -1)).mul_(p)  # P * (dP - delta)
            dq[b, q0:q1] = torch.bmm(ds, k[b, :, k0:k1]).transpose(0, 1)
            dk[b, k0:k1] = torch.bmm(ds.transpose(-2, -1), q[b, :, q0:q1]).transpose(0, 1)
            if dbias is not None:
                dbias[0, :, : q1 - q0, : k1 - k0] += ds
        dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
        _zero_outside(dq, [(b, q0, q1) for b, q0, q1, _, _ in ctx.spans])
        for grad in (dk, dv):
            _zero_outside(grad, [(b, k0, k1) for b, _, _, k0, k1 in ctx.spans])
        return dq, dk, dv, dbias, None


def _zero_outside(t: torch.Tensor, ranges) -> None:
    """Zero t (B, H, L, D) at every position of dim 2 outside the (row, start, end) ranges: the
    padding, written by no span. Cheaper than zero-filling all of t before the spans write it."""
    by_row: dict[int, list[tuple[int, int]]] = {}
    for b, start, end in ranges:
        by_row.setdefault(b, []).append((start, end))
    for b in range(t.shape[0]):
        at = 0
        for start, end in sorted(by_row.get(b, [])):
            if start > at:
                t[b, :, at:start].zero_()
            at = max(at, end)
        if at < t.shape[2]:
            t[b, :, at:].zero_()


def _span_attention_autograd(q, k, v, bias, spans, dropout_p):
    """The spans through F.scaled_dot_product_attention: no gradient needed, or attention dropout."""
    out = q.new_zeros(q.shape[:-1] + v.shape[-1:])
    for b, q0, q1, k0, k1 in spans:
        mask = None if bias is None else bias[0, :, : q1 - q0, : k1 - k0]
        out[b, :, q0:q1] = F.scaled_dot_product_attention(
            q[b, :, q0:q1], k[b, :, k0:k1], v[b, :, k0:k1], attn_mask=mask, dropout_p=dropout_p, scale=1.0)
    return out


def _same_segment(query_segments, key_segments):  # (B, Q), (B, K) -> (B, Q, K) bool
    return (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] != 0)


# ------------------------------------------------------------------ FlexAttention
def _flex_attention(device: torch.device):
    """flex_attention, compiled on GPU (its fused kernel); eager elsewhere (unfused, forward only).
    Inside a compiled model the plain function is returned: dynamo traces it as its higher-order op
    and lowers it to the same fused kernel, and nothing is cached or mutated while tracing (a Python
    global written from inside the graph would invalidate its guards and recompile at step 2)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex()


@functools.cache
def _compiled_flex():  # called only outside torch.compile's tracing (eager models on GPU)
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


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
