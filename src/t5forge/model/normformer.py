"""NormFormer (Shleifer et al. 2021, "NormFormer: Improved Transformer Pretraining with Extra
Normalization") as the block component "normformer" (`model.block=normformer`).

T5's pre-norm block plus the paper's three additions (its eq. 1-3; the fourth, the learned residual
scale lambda_resid, the paper drops for its larger models and this block does not have):

    x = x + drop(post_norm(o(concat_h(gamma_h * head_h(attn_norm(x))))))    PostAttn-Norm, HeadScale
    x = x + drop(post_cross_norm(cross_attn'(cross_norm(x), enc)))          decoder only (see below)
    x = x + drop(wo(drop(mid_norm(act(wi(ff_norm(x)))))))                   FFN LN after the activation

- Norms are RMSNorm (T5's, no bias, no mean subtraction) where the paper has LayerNorm, as every norm
  in T5 is. They and the head scales gamma (one per head) start at ones.
- Cross-attention: the paper's models are decoder-only and encoder-only, so it defines the norm and
  the head scale for self-attention only. Here the decoder's cross-attention gets both as well
  (cross_attn' above: head-scaled, then `post_cross_norm`): its output enters the residual stream
  the same way, unnormalised, which is what the paper's norm after attention addresses.
- Feed-forward: the mid norm sits inside the feed-forward, so the block knows the plain ones only,
  model.feed_forward "dense" (FeedForward) and "squared_relu" (SquaredReLUFeedForward), and takes
  over their activation; any other feed-forward is refused when the model is built (T5ForgeError),
  rather than silently dropping the norm. In a gated feed-forward the norm is applied to what feeds
  wo, act(wi_0 x) * wi_1 x. Dropout comes after the norm (T5's place for it, right before wo), so
  the norm never sees dropped units and eval and training see the same scale.

Every class here is a subclass of a plain one, so the speed converter (model/fast/) leaves them plain
(reference speed) and says so; the plain RMSNorms inside them are swapped for their twin as usual.
HF's T5 has no NormFormer: `t5forge export` refuses model.block=normformer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.feed_forwards import SquaredReLUFeedForward
from t5forge.model.t5 import Attention, FeedForward, PreNormBlock, RMSNorm

# The feed-forwards the mid norm can be put into, by class (exact types: a subclass may compute
# something else between the projections).
MID_NORM_FEED_FORWARDS = (FeedForward, SquaredReLUFeedForward)


class NormFormerAttention(Attention):
    """Attention with HeadScale: each head's output times its own learned `head_scale` (H,), before o."""

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.head_scale = nn.Parameter(torch.ones(config.num_heads))

    def heads(self, x, bias, context=None, kv=None, rotation=None):  # -> (B, H, Q, D): each head's output, before o
        q = self.split_heads(self.q(x))  # (B, H, Q, D)
        if rotation is not None:
            q = rotation(q)
        k, v = kv if kv is not None else self.project_kv(x if context is None else context, rotation)  # (B, H, K, D)
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)

    def forward(self, x, bias, context=None, kv=None, rotation=None):  # as Attention.forward: (B, Q, C) -> (B, Q, C)
        B, Q, _ = x.shape
        y = self.heads(x, bias, context, kv, rotation) * self.head_scale[:, None, None]  # (B, H, Q, D)
        return self.o(y.transpose(1, 2).reshape(B, Q, self.n_heads * self.d_kv))


class NormFormerFeedForward(FeedForward):
    """T5's feed-forward with an RMSNorm over its d_ff hidden units: wo(drop(mid_norm(act(wi x)))),
    gated wo(drop(mid_norm(act(wi_0 x) * wi_1 x))); the activation is that of the feed-forward it
    replaces (`from_plain`)."""

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.mid_norm = RMSNorm(config.d_ff, config.layer_norm_epsilon)

    @classmethod
    def from_plain(cls, plain: nn.Module, config: T5Config) -> NormFormerFeedForward:
        """The NormFormer version of `plain` (the block's configured feed-forward): its activation and
        shapes, plus the mid norm. A T5ForgeError when `plain` is not one it knows."""
        if type(plain) not in MID_NORM_FEED_FORWARDS:
            raise T5ForgeError(
                f"model.block='normformer' puts a norm inside the feed-forward and knows only model.feed_forward "
                f"'dense' and 'squared_relu'; model.feed_forward={config.feed_forward!r} "
                f"({type(plain).__name__}) cannot take it: set model.feed_forward to one of those, "
                f"or model.block=pre_norm"
            )
        ff = cls(config)
        ff.activation, ff.act = plain.activation, plain.act
        return ff

    def forward(self, x):  # (B, L, C) -> (B, L, C)
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, L, F)
        return self.wo(self.dropout(self.mid_norm(h)))


class NormFormerBlock(PreNormBlock):
    """"normformer": the pre-norm block with NormFormer's norms after attention and inside the
    feed-forward and its head-wise attention scale (see the module docstring)."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__(config, is_decoder)
        # The plain block built the plain sub-modules; the NormFormer ones replace them under the same
        # names (so parameter names stay T5's, plus the new ones). Their draws are overwritten by
        # T5.init_weights anyway.
        eps = config.layer_norm_epsilon
        self.attn, self.post_attn_norm = NormFormerAttention(config), RMSNorm(config.d_model, eps)
        if is_decoder:
            self.cross_attn, self.post_cross_norm = NormFormerAttention(config), RMSNorm(config.d_model, eps)
        self.ff = NormFormerFeedForward.from_plain(self.ff, config)

    @torch.no_grad()
    def init_weights(self):
        """NormFormer's additions start at ones (norm weights and head scales). T5.init_weights calls
        this instead of its own rules for the block (it has none) and still visits the children
        afterwards: their Attention / FeedForward / RMSNorm rules redraw q, k, v, o, wi, wo as in T5
        and never touch head_scale, so the order does not matter."""
        norms = [self.post_attn_norm, self.ff.mid_norm] + ([self.post_cross_norm] if self.is_decoder else [])
        attns = [self.attn] + ([self.cross_attn] if self.is_decoder else [])
        for p in [n.weight for n in norms] + [a.head_scale for a in attns]:
            nn.init.ones_(p)

    def forward(self, x, self_bias, enc=None, cross_bias=None, cache=None, rotation=None):
        # as PreNormBlock.forward: x (B, L, C); enc (B, S, C); cache: a generation.LayerCache when
        # decoding; rotation: the stack's, for self-attention
        h = self.attn_norm(x)
        kv = cache.self_kv(self.attn, h, rotation) if cache is not None else None
        x = x + self.dropout(self.post_attn_norm(self.attn(h, self_bias, kv=kv, rotation=rotation)))
        if self.is_decoder:
            kv = cache.cross_kv(self.cross_attn, enc) if cache is not None else None
            y = self.cross_attn(self.cross_norm(x), cross_bias, context=enc, kv=kv)
            x = x + self.dropout(self.post_cross_norm(y))
        return x + self.dropout(self.ff(self.ff_norm(x)))
