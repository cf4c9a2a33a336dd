"""The feed-forward twin and `fused_linear`, the stacked matmul of Linears that read one input
(wi_0 + wi_1 here, q + k + v and k + v in the attention twin)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t5forge.model.fast import compiled as stretches
from t5forge.model.t5 import FeedForward


def fused_linear(x, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """The outputs of several bias-free Linears that read the same input. Under autocast, from one
    matmul over their stacked weights: the input is cast once instead of once per layer (a cast
    and its backward are a full pass over an activation each), and its gradient is summed inside
    the matmul instead of from separately rounded bf16 parts. Without autocast there is no cast to
    save, and the strided outputs and the gradients' concatenation made the fp32 step slower
    (benchmarks/performance.md): separate matmuls then. The parameters stay separate either way,
    as in the HF checkpoint."""
    if not torch.is_autocast_enabled(x.device.type):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


class FastFeedForward(FeedForward):
    """The plain feed-forward with wi_0 / wi_1 from one matmul under autocast and, with `compiled`
    set (fast.apply), the gating act(gate) * linear as one compiled loop while training on CPU."""

    compiled = False

    def forward(self, x):  # (B, L, C) -> (B, L, C)
        if not self.gated:
            return super().forward(x)
        gate, linear = fused_linear(x, self.wi_0, self.wi_1)
        if self.activation in stretches.ACTIVATIONS and stretches.use_compiled(gate, self.compiled):
            h = stretches.compiled_gated(gate, linear, self.activation)
        else:
            h = self.act(gate) * linear  # (B, L, F)
        return self.wo(self.dropout(h))
