"""Attention back ends behind one switch (`T5Config.attention_backend`): "eager" and "sdpa".

T5 attention is softmax(q k^T + position_bias + mask) v with NO 1/sqrt(d) scaling (it is folded
into the initialisation of q). The interface has two calls so that a back end can prepare its own
form of the bias once per stack and reuse it in every layer:

    bias = make_attention_bias(backend, position_bias, key_padding_mask, causal, dtype)  # once per stack
    y = attend(backend, q, k, v, bias, dropout_p)                                        # every layer

eager and sdpa both use one dense additive float mask of shape (B or 1, H, Q, K): the relative
position bias with the padding / causal mask folded in as large negative numbers. A FlexAttention
back end would return a score_mod / block mask from `make_attention_bias` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("eager", "sdpa")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype when autocast is on, else the tensor's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def make_attention_bias(
    backend: str,
    position_bias: torch.Tensor | None,  # (1, H, Q, K) float, or None (cross-attention)
    key_padding_mask: torch.Tensor | None,  # (B, K), 1/True = attend, 0/False = padding
    causal: bool = False,
    query_offset: int = 0,  # position of the first query (decoding with a cache)
    dtype: torch.dtype = torch.float32,  # the dtype q/k/v will have
) -> torch.Tensor | None:
    """The bias every layer of one stack adds to its attention scores, in the back end's form."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}")
    bias = None if position_bias is None else position_bias.float()
    # finfo.min rather than -inf: a fully masked row then gives a uniform softmax instead of NaN.
    neg = torch.finfo(torch.float32).min
    if causal:
        assert bias is not None, "causal attention comes with a position bias in T5"
        q_len, k_len = bias.shape[-2:]
        q_pos = torch.arange(q_len, device=bias.device)[:, None] + query_offset
        k_pos = torch.arange(k_len, device=bias.device)[None, :]
        bias = bias.masked_fill(k_pos > q_pos, neg)  # (1, H, Q, K)
    if key_padding_mask is not None:
        pad = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, K)
        if bias is None:
            bias = torch.zeros(pad.shape, dtype=torch.float32, device=pad.device)
        bias = bias.masked_fill(pad, neg)  # (B, H, Q, K) or (B, 1, 1, K)
    if bias is None:
        return None
    if backend == "sdpa":
        # SDPA wants the mask in q's dtype; converting once here saves a cast in every layer.
        # min(fp32) overflows to -inf in fp16, so clamp to the target dtype's own minimum.
        bias = bias.clamp(min=torch.finfo(dtype).min).to(dtype)
    # eager keeps the bias in fp32: scores + bias then promote to fp32 for the softmax.
    return bias


def attend(
    backend: str,
    q: torch.Tensor,  # (B, H, Q, D)
    k: torch.Tensor,  # (B, H, K, D)
    v: torch.Tensor,  # (B, H, K, D)
    bias: torch.Tensor | None,  # from make_attention_bias
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, Q, D)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0)
    if backend == "eager":
        scores = q @ k.transpose(-2, -1)  # (B, H, Q, K), no 1/sqrt(D): T5 does not scale
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        return probs @ v
    raise ValueError(f"unknown attention backend {backend!r}")
