"""Feed-forward components beyond T5's dense one (model/t5.py `FeedForward`, registered "dense").

Each is registered by name in model/components.py and chosen with `model.feed_forward=NAME`. A
subclass of a plain component has no speed twin (the converter in model/fast/ swaps exact types
only), so it runs at reference speed until someone writes one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t5forge.model.t5 import FeedForward


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class SquaredReLUFeedForward(FeedForward):
    """"squared_relu": Primer's activation (So et al. 2021), relu(x)^2, in T5's feed-forward:
    wo(relu(wi x)^2), or gated wo(relu(wi_0 x)^2 * wi_1 x) when feed_forward_proj is "gated-*".
    Same parameters and initialisation as "dense"; only the activation differs."""

    def __init__(self, config):
        super().__init__(config)
        self.activation, self.act = "squared_relu", squared_relu
