"""FlexAttention, the "flex" attention back end's kernel (GPU): no dense bias at all. A score_mod
adds table[buckets[q, k], h] inside the kernel, and padding / causality / packed rows become a
block mask, so fully masked key blocks are skipped. Gradients reach the table through the
score_mod. Compiled on CUDA; on CPU torch runs its forward unfused (for tests) and refuses its
backward. No attention dropout.
"""

from __future__ import annotations

import functools

import torch

def flex_attention(device: torch.device):
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


def flex_bias(q_len: int, k_len: int, table=None, buckets=None, key_padding_mask=None, causal: bool = False,
              query_offset: int = 0, query_segments=None, key_segments=None):
    """(score_mod, block_mask) of one stack's attention: table (num_buckets, H) read at buckets (None:
    no position bias), either (Q, K) or, linear in the length, (Q + K - 1,) by distance: the bucket of
    key kv and query q_idx at [kv - q_idx + Q - 1] (T5RelativeBias.buckets(1, Q + K - 1,
    Q - 1 + query_offset)[0]); key_padding_mask (B, K) 1 = token; segments (B, Q) / (B, K)
    packed rows. Either may be None (nothing to add, nothing masked)."""
    from torch.nn.attention.flex_attention import create_block_mask

    score_mod = None
    if table is not None and buckets.dim() == 1:
        shift = q_len - 1  # q_idx counts from the first query; query_offset is already in the buckets

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[buckets[kv_idx - q_idx + shift], h].to(score.dtype)
    elif table is not None:
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
    return score_mod, block_mask
