"""Long inputs: T5's buckets beyond 512 against transformers', the query-block attention
(fast/blocked.py) against the formula and the dense path (padding, causality, packed rows, dropout),
and a converted model at 1.6k input tokens (blocked) against transformers' T5 and the plain model."""

import dataclasses

import pytest
import torch
from fast_cases import autograd_kinds, grads_of
from hf_twins import hf_reference, t5forge_config, twin

from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.fast.attention import stack_biases
from t5forge.model.fast.blocked import (
    QueryBlocks, _BlockedAttention, _dropout_keep, band, blocked_attention, plan_blocks, use_blocks,
)
from t5forge.model.fast.flex import flex_attention, flex_bias
from t5forge.model.loss import TokenNLL
from t5forge.model.masks import additive_bias, keep_mask
from t5forge.model.t5 import T5, T5RelativeBias

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
TOL = {"rtol": 1e-5, "atol": 1e-5}
LONG = 1600  # above BLOCKED_ABOVE_PAIRS (1600 x 1600 pairs), small enough for a dense reference in a second


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (64, 2048)])
@pytest.mark.parametrize("is_decoder", [False, True])
def test_buckets_equal_transformers_at_distances_up_to_16k(buckets, max_distance, is_decoder):
    transformers = pytest.importorskip("transformers")
    hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    config = T5Config(num_heads=2, relative_attention_num_buckets=buckets, relative_attention_max_distance=max_distance)
    position = T5RelativeBias(config, is_decoder)
    n = 16384
    ours = position.buckets(1, 2 * n - 1, n - 1)[0]  # every key - query distance in [-(n - 1), n - 1]
    theirs = hf_bucket(torch.arange(-(n - 1), n), bidirectional=not is_decoder, num_buckets=buckets,
                       max_distance=max_distance)
    assert torch.equal(ours, theirs)
    # and as a (Q, K) grid far from the diagonal: queries 8k.., keys 0..16k
    q_pos, k_pos = torch.arange(8000, 8040)[:, None], torch.arange(0, n, 97)[None]
    grid = position.buckets(40, n, 8000)[:, ::97]
    assert torch.equal(grid, hf_bucket(k_pos - q_pos, bidirectional=not is_decoder, num_buckets=buckets,
                                       max_distance=max_distance))
    assert int(ours.max()) == buckets - 1  # the far distances all land in the last bucket


def dense_problem(B=2, H=3, L=37, D=8, causal=False, mode="pad", seed=0):
    torch.manual_seed(seed)
    config = T5Config(num_heads=H, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    position = T5RelativeBias(config, is_decoder=causal)
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    mask = segments = None
    if mode == "pad":  # one row padded, with a hole too (a mask need not be a suffix)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, 20:] = 0
        mask[0, 5] = 0
    elif mode == "packed":  # three / two examples per row, padding at the end
        segments = torch.zeros(B, L, dtype=torch.long)
        segments[0, :10], segments[0, 10:30], segments[0, 30:] = 1, 2, 3
        segments[1, :25], segments[1, 25:33] = 1, 2
    keep = keep_mask(L, L, q.device, mask, causal=causal, query_segments=segments, key_segments=segments)
    reference = torch.softmax(q @ k.transpose(-2, -1) + additive_bias(position(L, L), keep, torch.float32), -1) @ v
    blocks = QueryBlocks(band(position, L, L, 8, torch.float32), L, L,
                         plan_blocks(B, L, L, 8, mask, causal, segments, segments),
                         key_keep=None if mask is None else mask.bool(), query_segments=segments,
                         key_segments=segments, causal=causal)
    real = torch.ones(B, L, dtype=torch.bool) if segments is None else segments != 0
    return (q, k, v, position), blocks, reference, real[:, None, :, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["none", "pad", "packed"])
def test_blocked_attention_equals_the_dense_formula_forward_and_backward(causal, mode):
    (q, k, v, position), blocks, reference, real = dense_problem(causal=causal, mode=mode)
    table = position.weight
    out = blocked_attention(q, k, v, blocks)
    assert type(out.grad_fn).__name__ == "_BlockedAttentionBackward"
    # the padding of packed rows attends nowhere: only the real queries' rows are compared (and read)
    torch.testing.assert_close(out * real, reference * real, **TOL)
    upstream = torch.randn(out.shape) * real
    got = torch.autograd.grad(out, (q, k, v, table), upstream)
    want = torch.autograd.grad(reference, (q, k, v, table), upstream)
    for name, a, b in zip(("q", "k", "v", "table"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_blocked_plan_skips_padding_and_other_examples_keys():
    # Packed row 0: examples [0, 10), [10, 30), [30, 37); blocks of 8 queries read only their examples' keys.
    _, blocks, _, _ = dense_problem(mode="packed")
    row0 = [(q0, k0, k1, masked) for b, q0, _, k0, k1, masked in blocks.blocks if b == 0]
    assert row0[0] == (0, 0, 10, False)  # queries 0-7: all in example 1, exactly its keys, no mask needed
    assert row0[1] == (8, 0, 30, True)  # queries 8-15 straddle examples 1 and 2
    _, padded, _, _ = dense_problem(mode="pad")
    assert all(k1 <= 20 for b, _, _, _, k1, _ in padded.blocks if b == 1)  # row 1's padding keys: never read


def test_blocked_attention_dropout_backward_uses_the_forward_masks():
    (q, k, v, position), blocks, _, _ = dense_problem(mode="pad")
    table = position.weight
    p, seed = 0.3, 1234
    out = _BlockedAttention.apply(q, k, v, blocks.band, blocks, p, seed)
    # the reference: the same per-block masks, assembled into one (B, H, Q, K) dropout matrix
    B, H, L, _ = q.shape
    keep = keep_mask(L, L, q.device, blocks.key_keep)
    scores = q @ k.transpose(-2, -1) + additive_bias(position(L, L), keep, torch.float32)
    drop = torch.zeros(B, H, L, L)
    for i, (b, q0, q1, k0, k1, _) in enumerate(blocks.blocks):
        drop[b, :, q0:q1, k0:k1] = _dropout_keep((H, q1 - q0, k1 - k0), p, seed, i, q)
    reference = (torch.softmax(scores, -1) * drop) @ v
    torch.testing.assert_close(out, reference, **TOL)
    assert 0.2 < (drop[:, :, :, :20] == 0).float().mean() < 0.4
    for a, b in zip(grads_of(out, (q, k, v, table)), grads_of(reference, (q, k, v, table))):
        torch.testing.assert_close(a, b, **TOL)


def long_batch(vocab: int, L: int = LONG, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (2, L), generator=g)
    attention_mask = torch.ones(2, L, dtype=torch.long)
    attention_mask[1, L - 300:] = 0
    labels = torch.randint(2, vocab, (2, 9), generator=g)
    labels[1, 6:] = -100
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask, labels


def test_long_input_converted_model_equals_transformers_loss_logits_and_gradients():
    config = t5forge_config("v1_1-gated-gelu-untied", num_layers=1, num_decoder_layers=1)
    hf = hf_reference(config).train()
    model = twin(hf, config, "sdpa", converted=True).train()
    input_ids, attention_mask, labels = long_batch(config.vocab_size)
    biases = stack_biases(model.encoder, model.shared(input_ids), attention_mask, None, None, 0, None, None, False)
    assert biases[0].blocks is not None  # the encoder does go by blocks at this length
    ref = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out = model(input_ids, attention_mask, labels=labels)
    assert "_BlockedAttentionBackward" in autograd_kinds(out.hidden)
    torch.testing.assert_close(model.logits(out.hidden), ref.logits, **TOL)
    loss = TokenNLL()(*model.output_projection(out.hidden), labels) / (labels != -100).sum()
    torch.testing.assert_close(loss, ref.loss, **TOL)
    loss.backward()
    ref.loss.backward()
    pairs = {"encoder.position.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder.blocks.0.attn.q.weight": "encoder.block.0.layer.0.SelfAttention.q.weight",
             "shared.weight": "shared.weight"}
    theirs = dict(hf.named_parameters())
    for mine, name in pairs.items():
        want = theirs[name].grad
        # the table's gradient sums 2 x 1600^2 pairs into 8 buckets, in another order: float rounding
        bound = 1e-4 if mine.endswith("position.weight") else 1e-5
        assert (dict(model.named_parameters())[mine].grad - want).abs().max() <= bound * want.abs().max(), mine


def test_long_packed_rows_blocked_equal_the_plain_model():
    torch.manual_seed(0)
    config = dataclasses.replace(T5Config.from_name("tiny", vocab_size=64, dropout_rate=0.0, num_layers=1,
                                                    num_decoder_layers=1))
    plain = T5(config)
    model, loss_fn, _ = fast.apply(T5(config), TokenNLL(), device="cpu")
    model.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(2)
    L, T = LONG, 12
    enc_seg, dec_seg = torch.zeros(1, L, dtype=torch.long), torch.zeros(1, T, dtype=torch.long)
    enc_seg[0, :700], enc_seg[0, 700:1500] = 1, 2
    dec_seg[0, :5], dec_seg[0, 5:10] = 1, 2
    batch = {"input_ids": torch.randint(2, 64, (1, L), generator=g).masked_fill(enc_seg == 0, 0),
             "labels": torch.randint(2, 64, (1, T), generator=g).masked_fill(dec_seg == 0, -100),
             "encoder_segment_ids": enc_seg, "decoder_segment_ids": dec_seg}
    ref = TokenNLL()(*plain.output_projection(plain(**batch).hidden), batch["labels"])
    hidden = model(**batch).hidden
    assert "_BlockedAttentionBackward" in autograd_kinds(hidden)
    out = loss_fn(*model.output_projection(hidden), batch["labels"])
    torch.testing.assert_close(out, ref, **TOL)
    ref.backward()
    out.backward()
    mine = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        bound = 1e-4 if name.endswith("position.weight") else 1e-5  # summed over 1.1M pairs: rounding
        assert (mine[name].grad - p.grad).abs().max() <= bound * max(p.grad.abs().max(), 1e-3), name


def test_long_input_generation_equals_the_plain_model():
    config = t5forge_config("v1_0-relu-tied", num_layers=1, num_decoder_layers=1)
    hf = hf_reference(config)
    input_ids, attention_mask, _ = long_batch(config.vocab_size)
    ref = twin(hf, config, "eager").generate(input_ids, attention_mask, max_new_tokens=5)
    out = twin(hf, config, "sdpa", converted=True).generate(input_ids, attention_mask, max_new_tokens=5)
    assert torch.equal(out, ref)


def test_short_inputs_keep_the_dense_path():
    assert not use_blocks(1024, 1024) and use_blocks(2048, 2048) and not use_blocks(114, 2048)


def test_flex_reads_buckets_by_distance_as_the_dense_grid():
    # the long-input form of flex's bias: (Q + K - 1,) buckets by distance, not a (Q, K) grid
    position = T5RelativeBias(T5Config(num_heads=2, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=20), is_decoder=False)
    Q = 40
    q, k, v = (torch.randn(1, 2, Q, 16) for _ in range(3))
    with torch.no_grad():
        grid, _ = flex_bias(Q, Q, position.weight, position.buckets(Q, Q))
        line, _ = flex_bias(Q, Q, position.weight, position.buckets(1, 2 * Q - 1, Q - 1)[0])
        flex = flex_attention(q.device)
        torch.testing.assert_close(flex(q, k, v, score_mod=line, scale=1.0), flex(q, k, v, score_mod=grid, scale=1.0))
