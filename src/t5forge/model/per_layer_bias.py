"""UMT5's position scheme, "t5_bias_per_layer": T5's relative bias with a table in every layer.

T5 learns one (num_buckets, H) table per stack and every layer adds the same bias. UMT5 (Chung et
al. 2023, "UniMax: Fairer and More Effective Language Sampling for Large-Scale Multilingual
Pretraining"; transformers' UMT5Attention) gives the self-attention of every layer, in the encoder
and in the decoder, a table of its own; the buckets (bidirectional in the encoder, causal in the
decoder), the missing 1/sqrt(d_kv) scaling and cross-attention without any position bias are T5's.

The seam in the stack (model/t5.py): a position component's forward may return a list, one bias per
layer, instead of one bias for all; `Stack.attention_biases` folds the mask into each, and block i
reads `layer_bias(self_bias, i)`. The tables are `layers.{i}` (parameter names
`{stack}.position.layers.{i}.weight`; HF's `{stack}.block.{i}.layer.0.SelfAttention.
relative_attention_bias.weight`, model/hf.py). Each is a plain T5RelativeBias, so T5.init_weights
draws it as T5's table. The speed twins' bias forms (fast/attention.py) read one table per stack;
a stack with this scheme keeps the dense bias (fast.apply), its attention and blocks still twins.
"""

from __future__ import annotations

from torch import nn

from t5forge.model.config import T5Config
from t5forge.model.t5 import T5RelativeBias


class PerLayerRelativeBias(nn.Module):
    """"t5_bias_per_layer": one T5RelativeBias table per layer of the stack."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        n_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.layers = nn.ModuleList([T5RelativeBias(config, is_decoder) for _ in range(n_layers)])

    def forward(self, q_len: int, k_len: int, offset: int = 0):  # -> [(1, H, Q, K) fp32] one per layer
        return [table(q_len, k_len, offset) for table in self.layers]
