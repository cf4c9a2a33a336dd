"""The Hourglass encoder (Nawrot et al. 2022, "Hierarchical Transformers Are More Efficient Language
Models") as the encoder component "hourglass" (`model.encoder=hourglass`).

T5's encoder stack whose middle blocks run on a sequence shortened by a factor k
(`hourglass_factor`), so that a long input costs less; the decoder's cross-attention reads the
full-length output as before:

    x = pre blocks(drop(x))                                      full length S (hourglass_pre blocks)
    s = shorten(x)                                               length ceil(S / k)
    s = shortened blocks(s)                                      num_layers - pre - post blocks
    x = x + upsample(s)[:, :S]                                   residual from before the shortening
    x = drop(final_norm(post blocks(x)))                         full length (hourglass_post blocks)

- Shortening: average pooling of k consecutive tokens (the paper's "AvgPool"), padding-aware: only
  real tokens are averaged, and a shortened position is padding when all its k tokens are. A length
  not divisible by k is padded (as padding) to the next multiple of k for this; the upsampled
  sequence is cut back to S, so the output has exactly the input's length.
- Upsampling: each shortened vector repeated k times (the paper's simplest, parameter-free
  upsampling; not its linear or attention upsampling). Within a group of k tokens, the tokens differ
  after the middle only by the residual and the post blocks.
- The paper's shift right before shortening exists to keep an autoregressive model causal; this
  encoder is bidirectional, so there is none.
- Positions: one position module (`position`, as in T5's stack) serves both lengths. The shortened
  blocks get its bias for the shortened length, so their relative distances are in units of k tokens
  (a T5 bucket 1 there is k tokens apart). Likewise RoPE (model.position=rope) rotates the shortened
  blocks' q and k by the shortened sequence's positions 0..ceil(S/k)-1, one step per k tokens.
- Packed rows (several examples per row, `finetune.pack=true`) would need the pooling to stop at
  example boundaries; they are refused with a T5ForgeError.

The parameters are exactly the plain stack's (`blocks.{i}`, `position`, `final_norm`): blocks
0..pre-1 run before the shortening, the last `post` after it. It is a subclass of Stack, so the
speed converter (model/fast/) leaves the stack plain (its blocks, attention and norms still get
their twins). HF's T5 has no such encoder: `t5forge export` refuses model.encoder=hourglass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.t5 import Stack, layer_bias


def shorten(x, mask, k: int):
    """Average pooling of k consecutive tokens over real tokens only.

    x: (B, S, C); mask: (B, S) 1 = token, or None (all real) -> (pooled (B, ceil(S/k), C), its mask
    (B, ceil(S/k)) or None when every shortened position holds a real token)."""
    B, S, C = x.shape
    pad = -S % k
    if mask is None and pad == 0:
        return x.view(B, S // k, k, C).mean(2), None
    keep = torch.ones(B, S, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    keep = F.pad(keep, (0, pad))  # (B, S') the padding up to a multiple of k is padding
    x = F.pad(x, (0, 0, 0, pad)) * keep[..., None]  # padding contributes nothing to the sums
    count = keep.view(B, -1, k).sum(2)  # (B, S'/k) real tokens per group
    pooled = x.view(B, -1, k, C).sum(2) / count.clamp(min=1)[..., None]
    return pooled, (count > 0).long()


def upsample(s, k: int, length: int):
    """Each of s's (B, L, C) vectors repeated k times, cut to `length` tokens: (B, length, C)."""
    return s.repeat_interleave(k, dim=1)[:, :length]


class HourglassStack(Stack):
    """"hourglass": the encoder with its middle blocks on a k-times shorter sequence (module docstring)."""

    def __init__(self, config: T5Config, is_decoder: bool = False):
        if is_decoder:
            raise T5ForgeError("the hourglass stack is an encoder (model.encoder=hourglass); the decoder is T5's")
        super().__init__(config, is_decoder=False)
        self.factor, self.pre, self.post = config.hourglass_factor, config.hourglass_pre, config.hourglass_post

    def forward(self, x, mask=None, enc=None, enc_mask=None, cache=None, segments=None, enc_segments=None):
        # x: (B, S, C) embedded tokens; mask: (B, S) 1 = token -> (B, S, C)
        if segments is not None:
            raise T5ForgeError("hourglass encoder does not support packed rows; set finetune.pack=false "
                               "(or use model.encoder=stack)")
        S, k = x.shape[1], self.factor
        n_short = len(self.blocks) - self.pre - self.post
        full_bias, _ = self.attention_biases(x, mask, None, None, 0, None, None)
        full_rotation = self.rotation(S)
        x = self.dropout(x)
        short = range(self.pre, self.pre + n_short)
        for i in range(self.pre):
            x = self.blocks[i](x, layer_bias(full_bias, i), rotation=full_rotation)
        s, short_mask = shorten(x, mask, k)
        short_bias, _ = self.attention_biases(s, short_mask, None, None, 0, None, None)
        short_rotation = self.rotation(s.shape[1])  # the shortened sequence's own positions 0..ceil(S/k)-1
        for i in short:
            s = self.blocks[i](s, layer_bias(short_bias, i), rotation=short_rotation)
        x = x + upsample(s, k, S)
        for i in range(short.stop, len(self.blocks)):
            x = self.blocks[i](x, layer_bias(full_bias, i), rotation=full_rotation)
        return self.dropout(self.final_norm(x))  # (B, S, C)

