"""The block and stack twins: the fused residual and the attention bias in the twins' forms.

The plain block adds each sublayer's update to the residual stream right away: x = x + drop(f(norm(x))).
Here a block takes and returns the stream as (x, delta): x plus the update its last sublayer made,
not yet added. The add then happens inside the next norm, which reads the sum anyway
(FastRMSNorm.add_forward), so that compiled (fast/compiled.py) it is one pass instead of two. The
values are the plain block's: the same adds in the same order.

The stack twin takes that loop only when every block is a FastBlock with twin norms (fast.apply
decides, `fused_residual`); otherwise it runs the plain loop. It hands its blocks the attention
bias as fast/attention.py's AttentionBias forms only when all their attention modules are twins and
its position scheme is exactly T5RelativeBias (`bias_forms`); otherwise the plain dense bias. A
rotating position scheme (RoPE) is asked for its rotation as in the plain stack, and every block
gets it; the attention twin applies it as the plain attention does.
"""

from __future__ import annotations

from t5forge.model.fast.attention import stack_biases
from t5forge.model.t5 import PreNormBlock, Stack, layer_bias


class FastBlock(PreNormBlock):
    """The pre-norm block with `forward_pending`, the (x, delta) convention; `forward` stays plain."""

    def forward_pending(self, x, delta, self_bias, enc=None, cross_bias=None, cache=None, rotation=None):
        # x, delta: the residual stream and its pending update (None: nothing pending) -> the same pair
        x, h = self.attn_norm.add_forward(x, delta)
        kv = cache.self_kv(self.attn, h, rotation) if cache is not None else None
        delta = self.dropout(self.attn(h, self_bias, kv=kv, rotation=rotation))
        if self.is_decoder:
            x, h = self.cross_norm.add_forward(x, delta)
            kv = cache.cross_kv(self.cross_attn, enc) if cache is not None else None
            delta = self.dropout(self.cross_attn(h, cross_bias, context=enc, kv=kv))
        x, h = self.ff_norm.add_forward(x, delta)
        return x, self.dropout(self.ff(h))


class FastStack(Stack):
    """The plain stack's forward with the fused residual and the twins' bias forms where they apply."""

    fused_residual = False  # every block a FastBlock with twin norms (set by fast.apply)
    bias_forms = False  # every attention module a twin, the position exactly T5RelativeBias (fast.apply)

    def attention_biases(self, x, mask, enc, enc_mask, offset, segments, enc_segments, decoding: bool = False):
        """The plain dense biases, or (bias_forms) the AttentionBias forms the attention twins read;
        decoding: a generation cache is in use (flex then takes the dense form)."""
        if not self.bias_forms:
            return super().attention_biases(x, mask, enc, enc_mask, offset, segments, enc_segments)
        return stack_biases(self, x, mask, enc, enc_mask, offset, segments, enc_segments, decoding)

    def forward(self, x, mask=None, enc=None, enc_mask=None, cache=None, segments=None, enc_segments=None):
        # as Stack.forward: x (B, L, C) embedded tokens -> (B, L, C)
        offset = cache.length if cache is not None else 0
        self_bias, cross_bias = self.attention_biases(x, mask, enc, enc_mask, offset, segments, enc_segments,
                                                      decoding=cache is not None)
        rotation = self.rotation(x.shape[1], offset)
        x = self.dropout(x)
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        if self.fused_residual:
            delta = None
            for i, (block, layer) in enumerate(zip(self.blocks, layers)):
                x, delta = block.forward_pending(x, delta, layer_bias(self_bias, i), enc, cross_bias, cache=layer,
                                                 rotation=rotation)
            h = self.final_norm.add_forward(x, delta)[1]
        else:
            for i, (block, layer) in enumerate(zip(self.blocks, layers)):
                x = block(x, layer_bias(self_bias, i), enc, cross_bias, cache=layer, rotation=rotation)
            h = self.final_norm(x)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.dropout(h)  # (B, L, C)
