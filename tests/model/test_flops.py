"""FLOPs per training step (model/flops.py): counted from the model's components on the meta
device, equal to T5's closed form and to a hand count, and right for a component that computes
more (or less) than T5's."""

import pytest
import torch
from torch import nn

from t5forge.model import components
from t5forge.model.config import T5Config
from t5forge.model.flops import t5_flops_per_step, training_flops
from t5forge.model.t5 import FeedForward

TINY = T5Config.from_name("tiny", dropout_rate=0.0)


def hand_count(B, S, T):
    """Every matmul of a tiny T5 step as (rows, inner, cols), x2 FLOPs per MAC, x3 for fwd + bwd."""
    d, inner, ff, V = 64, 4 * 16, 128, 32128
    mm = []
    for _ in range(2):  # encoder layers
        mm += [(B * S, d, inner)] * 4  # q, k, v, o
        mm += [(B * S, d, ff)] * 2 + [(B * S, ff, d)]  # wi_0, wi_1, wo
        mm += [(B * 4 * S, 16, S), (B * 4 * S, S, 16)]  # scores QK^T, then AV, per head
    for _ in range(2):  # decoder layers
        mm += [(B * T, d, inner)] * 4  # self-attention q, k, v, o
        mm += [(B * T, d, inner)] * 2 + [(B * S, d, inner)] * 2  # cross q, o on targets; k, v on encoder
        mm += [(B * T, d, ff)] * 2 + [(B * T, ff, d)]
        mm += [(B * 4 * T, 16, T), (B * 4 * T, T, 16), (B * 4 * T, 16, S), (B * 4 * T, S, 16)]
    mm.append((B * T, d, V))  # lm_head
    return sum(3 * 2 * m * k * n for m, k, n in mm)


def test_closed_form_matches_a_hand_count():
    assert t5_flops_per_step(TINY, batch_size=2, input_length=16, target_length=4) == hand_count(2, 16, 4)
    assert t5_flops_per_step(TINY, 3, 24, 8) == hand_count(3, 24, 8)
    relu = TINY.replace(feed_forward_proj="relu")
    # Non-gated FFN: one d x d_ff matmul less per layer and token.
    diff = t5_flops_per_step(TINY, 1, 16, 4) - t5_flops_per_step(relu, 1, 16, 4)
    assert diff == 6 * 64 * 128 * (2 * 16 + 2 * 4)


@pytest.mark.parametrize("changes", [{}, {"feed_forward_proj": "relu", "tie_word_embeddings": True},
                                     {"num_decoder_layers": 1, "num_heads": 2, "d_kv": 24}])
def test_counted_flops_equal_the_closed_form_for_t5(changes):
    config = TINY.replace(**changes)
    assert training_flops(config, 2, 16, 4) == t5_flops_per_step(config, 2, 16, 4)
    assert training_flops(config, 3, 24, 8) == t5_flops_per_step(config, 3, 24, 8)


def test_counted_flops_equal_a_real_training_step_on_cpu():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from t5forge.model.loss import seq2seq_loss
    from t5forge.model.t5 import T5

    model = T5(TINY)
    input_ids, labels = torch.randint(3, 1000, (2, 16)), torch.randint(3, 1000, (2, 4))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        seq2seq_loss(model, input_ids=input_ids, labels=labels).backward()
    assert counter.get_total_flops() == training_flops(TINY, 2, 16, 4)


class WideFeedForward(FeedForward):
    """T5's feed-forward with one more d_ff x d_ff matmul inside: a component the closed form does not know."""

    def __init__(self, config):
        super().__init__(config)
        self.mid = nn.Linear(config.d_ff, config.d_ff, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.dropout(self.mid(h)))


def test_a_new_component_is_counted_as_it_computes(monkeypatch):
    monkeypatch.setitem(components.FEED_FORWARDS, "wide", WideFeedForward)
    wide = TINY.replace(feed_forward="wide")
    B, S, T, ff = 2, 16, 4, TINY.d_ff
    extra = 6 * ff * ff * (S * TINY.num_layers + T * TINY.num_decoder_layers) * B  # one more matmul per token and layer
    assert training_flops(wide, B, S, T) == t5_flops_per_step(TINY, B, S, T) + extra
