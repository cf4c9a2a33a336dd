"""Training FLOPs of a step, counted from the model's own components (for MFU).

`training_flops` builds the configured model on the meta device (shapes only: no memory, no arithmetic) and
runs one training forward and backward under torch's FlopCounterMode, which adds up every matmul
the components actually issue: a research component (another feed-forward, a mixture of experts, a
different encoder) is counted as it computes, with nothing to keep in step by hand. Matmuls only,
2 FLOPs per multiply-add: embedding lookups, norms, softmax and elementwise work are left out, the
causal decoder's masked half is counted (the PaLM / nanoGPT convention), and padding counts like
real tokens (it costs the same hardware work).

`t5_flops_per_step` is the same count in closed form for T5's own components; a test holds the two
equal, which documents what is counted.
"""

from __future__ import annotations

import functools

import torch

from t5forge.model.config import T5Config


@functools.lru_cache(maxsize=32)
def _one_example(config: T5Config, input_length: int, target_length: int) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from t5forge.model.loss import TokenNLL
    from t5forge.model.t5 import T5

    # The meta device: shapes and dtypes, no storage and no arithmetic.
    with torch.device("meta"):
        model = T5(config.replace(dropout_rate=0.0))
        input_ids = torch.zeros(1, input_length, dtype=torch.long)
        labels = torch.zeros(1, target_length, dtype=torch.long)
        # SDPA's math back end: attention as the two matmuls it is, which the counter sees.
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = model(input_ids, labels=labels)
            loss = TokenNLL()(*model.output_projection(out.hidden), labels)
            for aux in out.aux_losses.values():
                loss = loss + aux.weight * aux.term
            loss.backward()
    return counter.get_total_flops()


def training_flops(config: T5Config, batch_size: int, input_length: int, target_length: int) -> int:
    """Forward + backward matmul FLOPs of one optimizer step over batch_size examples of the given
    lengths (the whole step: all micro-batches, all ranks)."""
    return batch_size * _one_example(config, input_length, target_length)


def t5_flops_per_step(config, batch_size: int, input_length: int, target_length: int) -> int:
    """`training_flops` of T5's own components in closed form (dense feed-forward, T5 attention).

    With d = d_model, h = num_heads * d_kv, F = 3 * d * d_ff (gated FFN: wi_0, wi_1, wo; else
    2 * d * d_ff), Le / Ld encoder / decoder layers, V = vocab_size, S = input_length,
    T = target_length, and 2 FLOPs per multiply-add, x3 for forward + backward (the 6*N rule):

        encoder matmuls   6 * S * Le * (4*d*h + F)               q, k, v, o + FFN per encoder token
        cross-attn k, v   6 * S * Ld * (2*d*h)                   computed once per encoder token
        decoder matmuls   6 * T * (Ld * (4*d*h + 2*d*h + F) + d*V)   self-attn, cross q/o, FFN, lm_head
        attention scores  12 * h * (Le*S*S + Ld*T*T + Ld*T*S)    QK^T and AV, forward 4*h per pair

    all times batch_size.
    """
    d, h = config.d_model, config.num_heads * config.d_kv
    enc_layers = config.num_layers
    dec_layers = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
    ffn = (3 if str(config.feed_forward_proj).startswith("gated") else 2) * d * config.d_ff
    S, T = input_length, target_length
    per_encoder_token = enc_layers * (4 * d * h + ffn) + dec_layers * 2 * d * h
    per_decoder_token = dec_layers * (4 * d * h + 2 * d * h + ffn) + d * config.vocab_size
    matmul = 6 * (S * per_encoder_token + T * per_decoder_token)
    attention = 12 * h * (enc_layers * S * S + dec_layers * T * T + dec_layers * T * S)
    return batch_size * (matmul + attention)
