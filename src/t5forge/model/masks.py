"""Which keys each query may attend to: padding, causality and packed rows, as boolean masks.

A stack builds these once per forward and folds them into its attention bias (model/t5.py,
`Stack.attention_biases`): the additive bias every layer adds to its scores is the position bias
with the forbidden (query, key) pairs set to the most negative number of the matmuls' dtype.
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype when autocast is on, else the tensor's."""
    # A device type without autocast (meta, on which model/flops.py counts FLOPs) runs in x's dtype.
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def keep_mask(
    q_len: int,
    k_len: int,
    device: torch.device,
    key_padding_mask: torch.Tensor | None = None,  # (B, K), 1 = token, 0 = padding
    causal: bool = False,
    query_offset: int = 0,  # position of the first query (decoding with a cache)
    query_segments: torch.Tensor | None = None,  # (B, Q) packed rows: example number, 0 = padding
    key_segments: torch.Tensor | None = None,  # (B, K)
) -> torch.Tensor | None:
    """(B or 1, 1, Q, K) bool, True where the query may attend to the key; None when all may."""
    if (query_segments is None) != (key_segments is None):
        raise ValueError("query_segments and key_segments go together")
    keep = None
    if causal:
        q_pos = torch.arange(q_len, device=device)[:, None] + query_offset
        k_pos = torch.arange(k_len, device=device)[None, :]
        keep = (k_pos <= q_pos)[None, None]  # (1, 1, Q, K)
    if key_padding_mask is not None:
        pad = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, K)
        keep = pad if keep is None else keep & pad
    if query_segments is not None:  # a query sees the keys of its own example only; padding none
        same = (query_segments[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] != 0)
        keep = same[:, None] if keep is None else keep & same[:, None]
    return keep


def additive_bias(bias: torch.Tensor | None, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bias (1, H, Q, K) or None with the pairs outside `keep` set to finfo(dtype).min, in `dtype`.

    finfo.min rather than -inf: a fully masked row (a padding query) then gives a uniform softmax
    instead of NaN. The minimum of the matmuls' dtype, as fp32's overflows to -inf in bf16 / fp16."""
    if keep is not None:
        if bias is None:
            bias = torch.zeros((), dtype=torch.float32, device=keep.device)
        bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return None if bias is None else bias.to(dtype)
