"""Packed rows as spans: sdpa's CPU form of several examples per row (the attention twin, fast/attention.py).

Each example attends over its own slice of the row, so attention costs sum(length^2) over the
examples whatever the row width, and a micro-batch can be packed into one row with no padding to
speak of. T5's bias depends only on key - query, so every example reads the top-left corner of one
(H, longest, longest) bias. Each attention of a stack takes whichever layout costs less
(`cheaper_as_spans`): SNI's long prompts go by example, its few-token targets as one short dense row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


# One span's fixed cost (a dozen small calls forward and backward) in units of score cells (query x
# key pairs, all heads): what a dense mask computes in that time, measured on CPU at t5-v1.1-small
# (benchmarks/performance.md); only its order of magnitude matters.
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


class _SpanAttention(torch.autograd.Function):
    """Attention within each example of packed rows, one span at a time: softmax(q k^T + bias) v over
    the example's own queries and keys, as _BiasedAttention does for a whole row. Only the spans'
    (H, lq, lk) probabilities are kept for the backward pass. `bias` (1, H, Q, K) is shared: every
    span adds its top-left (lq, lk) corner and the bias gradient sums there. Queries outside every
    span (padding) get 0; a key is in at most one span, so dk / dv slices never overlap.

    The output and dq / dk / dv are (B, L, H, D) buffers handed out as (B, H, L, D) views: the
    projections around attention read and write (B, L, H*D), so no copy is left at either end, and
    each span's product is computed fresh and then copied into its slice (bmm into a strided `out`
    was slower than that). Against the padded batch's dense attention: benchmarks/finetune_packing.py."""

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
