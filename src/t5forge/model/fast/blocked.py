"""Attention by blocks of queries, for long inputs: no (B, H, Q, K) tensor exists at any point.

The dense path (fast/attention.py) gives every layer one additive (B|1, H, Q, K) bias and keeps
each layer's (B, H, Q, K) probabilities for the backward pass: at 16k tokens and 6 heads that is
6 GiB per tensor. Here:

- The position bias. T5's bias depends on key - query only, so one (H, block, Q + K - 1) band of it
  serves every query block of every layer: block [q0, q0 + n) reads the band's column window that
  starts at Q - 1 - q0 (row a, column c holds the bias of distance c - a - (Q - 1)). It is computed
  once per stack forward from the bucket table (`band`), and its gradient flows back to the table.
- The masks. Padding, causality and packed rows are applied per block from the (B, K) padding mask
  and the (B, L) segment ids; each (row, query block) reads only the keys that some of its queries
  may see (`plan_blocks`), so padding and other examples of a packed row cost nothing.
- Memory. Per (row, query block) the forward pass computes its (H, n, k) scores, softmax and
  product with v, and keeps only the log-sum-exp of each query; the backward pass recomputes the
  block's probabilities from it (FlashAttention's scheme). A layer keeps q, k, v, the output and
  (B, H, Q) floats: memory grows linearly with the length.
- Attention dropout draws each block's mask from a generator seeded per block, so the backward
  pass regenerates the same mask.

Rows with no key to attend (the padding of a packed row) average over their block's key range,
where the dense path averages over all keys; nothing reads those rows (their keys are masked for
every real query), so the loss and every gradient are the dense path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The dense path is taken while one row's attention has at most this many (query, key) pairs; above
# it (from about 1.5k x 1.5k tokens), the blocked path. Per row, not per batch: the dense kernels are
# what short-input training (512 tokens, large batches) was tuned on, and the blocked path is their
# equal or faster once rows are long (benchmarks/results/long_inputs-cpu-*.md), while its memory
# (linear in the length) is what makes 2k-16k inputs fit at all.
BLOCKED_ABOVE_PAIRS = 2**21
# A block's (H, n, K) scores are kept near this many cells (16 MiB of fp32): large enough for
# efficient matmuls, small enough that a block's passes run from cache rather than memory.
BLOCK_CELLS = 2**22


def use_blocks(q_len: int, k_len: int) -> bool:
    """Whether an attention of q_len queries over k_len keys goes by query blocks."""
    return q_len * k_len > BLOCKED_ABOVE_PAIRS


def block_size(heads: int, k_len: int) -> int:
    """Queries per block: BLOCK_CELLS / (heads x keys), a power of two in [16, 256]."""
    n = max(BLOCK_CELLS // max(heads * k_len, 1), 16)
    return min(1 << (n.bit_length() - 1), 256)


@dataclass
class QueryBlocks:
    """One stack's attention in blocks of queries: what every layer of it shares."""

    band: torch.Tensor | None  # (H, block, Q + K - 1) position bias by distance, or None (no bias)
    q_len: int
    k_len: int
    blocks: list  # (row, q0, q1, k0, k1, masked): keys outside [k0, k1) are masked for these queries
    key_keep: torch.Tensor | None = None  # (B, K) bool, False = padding
    query_segments: torch.Tensor | None = None  # (B, Q) packed rows: example number, 0 = padding
    key_segments: torch.Tensor | None = None  # (B, K)
    causal: bool = False
    band_device: torch.device = torch.device("cpu")  # where the causal mask is made (set by blocked_attention)

    def keep(self, b: int, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor | None:
        """(n, k) or (1, k) bool: which keys of [k0, k1) the queries [q0, q1) of row b may see."""
        keep = None
        if self.key_keep is not None:
            keep = self.key_keep[b, k0:k1][None]
        if self.query_segments is not None:
            keys = self.key_segments[b, k0:k1][None]
            same = (self.query_segments[b, q0:q1, None] == keys) & (keys != 0)
            keep = same if keep is None else keep & same
        if self.causal:
            later = (torch.arange(k0, k1, device=self.band_device)[None]
                     <= torch.arange(q0, q1, device=self.band_device)[:, None])
            keep = later if keep is None else keep & later
        return keep


def band(position, q_len: int, k_len: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, block, q_len + k_len - 1): position bias of distance c - a - (q_len - 1) at [:, a, c],
    from a T5RelativeBias (its buckets at query offset q_len - 1)."""
    return position(block, q_len + k_len - 1, q_len - 1)[0].to(dtype)


def plan_blocks(batch: int, q_len: int, k_len: int, block: int, key_padding_mask=None, causal: bool = False,
                query_segments=None, key_segments=None) -> list:
    """(row, q0, q1, k0, k1, masked) of every (batch row, query block): [k0, k1) the smallest key
    range holding every key some query of the block may see, `masked` whether some key inside it is
    still hidden from some query. Read on the host once per stack forward."""
    keep_rows = key_padding_mask.bool().tolist() if key_padding_mask is not None else None
    q_rows = query_segments.tolist() if query_segments is not None else None
    k_rows = key_segments.tolist() if key_segments is not None else None
    blocks = []
    for b in range(batch):
        kept_lo, kept_hi, holes = 0, k_len, False
        if keep_rows is not None:
            kept = [i for i, keep in enumerate(keep_rows[b]) if keep]
            kept_lo, kept_hi = (kept[0], kept[-1] + 1) if kept else (0, k_len)
            holes = len(kept) != kept_hi - kept_lo
        runs = _runs(k_rows[b]) if k_rows is not None else None
        for q0 in range(0, q_len, block):
            q1 = min(q0 + block, q_len)
            k0, k1, masked = kept_lo, kept_hi, holes
            if runs is not None:
                present = {s for s in q_rows[b][q0:q1] if s != 0 and s in runs}
                if present:
                    k0 = max(k0, min(runs[s][0] for s in present))
                    k1 = min(k1, max(runs[s][1] for s in present))
                one = len(present) == 1 and 0 not in q_rows[b][q0:q1]
                masked = masked or not (one and runs[next(iter(present))] == (k0, k1))
            if causal:
                k1 = min(k1, q1)
                masked = masked or k1 - 1 > q0
            if k1 <= k0:  # no query here sees any key: the dense path's uniform rows, over all keys
                k0, k1, masked = 0, k_len, True
            blocks.append((b, q0, q1, k0, k1, masked))
    return blocks


def _runs(row: list[int]) -> dict[int, tuple[int, int]]:  # segment -> (first, last + 1) of its keys
    runs: dict[int, tuple[int, int]] = {}
    for i, s in enumerate(row):
        if s != 0:
            lo, _ = runs.get(s, (i, i))
            runs[s] = (lo, i + 1)
    return runs


def blocked_attention(q, k, v, blocks: QueryBlocks, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T + bias) v, block by block; q: (B, H, Q, D), k, v: (B, H, K, D) -> (B, H, Q, D)."""
    seed = int(torch.randint(2**62, (1,)).item()) if dropout_p > 0.0 else 0  # the global RNG decides
    blocks.band_device = q.device
    return _BlockedAttention.apply(q, k, v, blocks.band, blocks, dropout_p, seed)


def _scores(q, k, band_, blocks: QueryBlocks, b, q0, q1, k0, k1, masked):  # -> (H, n, k) scores
    q_blk, k_t = q[b, :, q0:q1], k[b, :, k0:k1].transpose(-2, -1)
    if band_ is None:
        scores = torch.bmm(q_blk, k_t)
    else:
        c0 = blocks.q_len - 1 - q0
        scores = torch.baddbmm(band_[:, : q1 - q0, c0 + k0: c0 + k1], q_blk, k_t)
    if masked:
        keep = blocks.keep(b, q0, q1, k0, k1)
        if keep is not None:
            scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
    return scores


def _dropout_keep(shape, p: float, seed: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """The block's kept-and-rescaled dropout mask, the same in the forward and the backward pass."""
    g = torch.Generator(device=like.device).manual_seed(seed + index)
    return (torch.rand(shape, generator=g, device=like.device) >= p).to(like.dtype).div_(1.0 - p)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, band_, blocks: QueryBlocks, dropout_p: float, seed: int):
        B, H, Q, _ = q.shape
        # (B, Q, H, D) handed out as (B, H, Q, D): the output projection reads (B, Q, H*D) with no copy
        out = q.new_empty(B, Q, H, v.shape[-1])
        lse = q.new_empty(B, H, Q, 1)
        for i, (b, q0, q1, k0, k1, masked) in enumerate(blocks.blocks):
            s = _scores(q, k, band_, blocks, b, q0, q1, k0, k1, masked)
            m = s.amax(-1, keepdim=True)
            s.sub_(m).exp_()
            total = s.sum(-1, keepdim=True)
            lse[b, :, q0:q1] = m + total.log()
            if dropout_p > 0.0:
                s.mul_(_dropout_keep(s.shape, dropout_p, seed, i, s))
            out[b, q0:q1] = (torch.bmm(s, v[b, :, k0:k1]) / total).transpose(0, 1)  # normalised after @ v
        out = out.transpose(1, 2)
        ctx.save_for_backward(q, k, v, band_, out, lse)
        ctx.blocks, ctx.dropout_p, ctx.seed = blocks, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, band_, out, lse = ctx.saved_tensors
        blocks, p_drop = ctx.blocks, ctx.dropout_p
        B, H, Q, D = q.shape
        dq = q.new_empty(B, Q, H, D)
        dk, dv = k.new_zeros(B, k.shape[2], H, D), v.new_zeros(B, v.shape[2], H, v.shape[-1])
        dband = torch.zeros_like(band_) if band_ is not None and ctx.needs_input_grad[3] else None
        neg_delta = (dout * out).sum(-1, keepdim=True).neg_()  # (B, H, Q, 1) = -rowsum(dP * P)
        for i, (b, q0, q1, k0, k1, masked) in enumerate(blocks.blocks):
            p = _scores(q, k, band_, blocks, b, q0, q1, k0, k1, masked).sub_(lse[b, :, q0:q1]).exp_()
            d = dout[b, :, q0:q1]  # (H, n, D)
            v_blk = v[b, :, k0:k1]
            if p_drop > 0.0:
                keep = _dropout_keep(p.shape, p_drop, ctx.seed, i, p)
                dv[b, k0:k1] += torch.bmm((p * keep).transpose(-2, -1), d).transpose(0, 1)
                ds = torch.bmm(d, v_blk.transpose(-2, -1)).mul_(keep).add_(neg_delta[b, :, q0:q1]).mul_(p)
            else:
                dv[b, k0:k1] += torch.bmm(p.transpose(-2, -1), d).transpose(0, 1)
                ds = torch.baddbmm(neg_delta[b, :, q0:q1], d, v_blk.transpose(-2, -1)).mul_(p)  # P * (dP - delta)
            dq[b, q0:q1] = torch.bmm(ds, k[b, :, k0:k1]).transpose(0, 1)
            dk[b, k0:k1] += torch.bmm(ds.transpose(-2, -1), q[b, :, q0:q1]).transpose(0, 1)
            if dband is not None:
                c0 = blocks.q_len - 1 - q0
                dband[:, : q1 - q0, c0 + k0: c0 + k1] += ds
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dband, None, None, None
