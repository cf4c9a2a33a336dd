"""Packed rows (several examples per row, told apart by segment ids) against the padded batch of
the same examples: same summed loss, same gradients, same per-token logits, for the plain model
(dense block-diagonal mask) and the converted one (model/fast/): sdpa on CPU attends example by
example there (fast/spans.py), so the two are also checked against each other; the span kernel
itself against the formula."""

import dataclasses

import pytest
import torch

from fast_cases import autograd_kinds

from t5forge.model import fast
from t5forge.model.config import T5Config
from t5forge.model.fast.attention import AttentionBias, attend
from t5forge.model.fast.spans import _SpanAttention, cheaper_as_spans, segment_spans
from t5forge.model.loss import TokenNLL
from t5forge.model.t5 import T5

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
TOL = {"rtol": 1e-5, "atol": 1e-5}

# (source length, target length) of five examples; packed into two rows: [0, 1, 2] and [3, 4].
LENGTHS = [(7, 3), (12, 5), (4, 2), (20, 6), (9, 4)]
ROWS = [[0, 1, 2], [3, 4]]


def examples(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, vocab, (s,), generator=g), torch.randint(2, vocab, (t,), generator=g))
            for s, t in LENGTHS]


def padded(exs):
    S, T = max(len(s) for s, _ in exs), max(len(t) for _, t in exs)
    input_ids, mask = torch.zeros(len(exs), S, dtype=torch.long), torch.zeros(len(exs), S, dtype=torch.long)
    labels = torch.full((len(exs), T), -100)
    for i, (s, t) in enumerate(exs):
        input_ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(t)] = s, 1, t
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def packed(exs, rows=ROWS, width_pad=3):
    S = max(sum(len(exs[i][0]) for i in r) for r in rows) + width_pad  # padding at the end of each row
    T = max(sum(len(exs[i][1]) for i in r) for r in rows) + width_pad
    out = {"input_ids": torch.zeros(len(rows), S, dtype=torch.long), "labels": torch.full((len(rows), T), -100),
               "encoder_segment_ids": torch.zeros(len(rows), S, dtype=torch.long),
               "decoder_segment_ids": torch.zeros(len(rows), T, dtype=torch.long)}
    where = {}  # example -> (row, target start)
    for r, members in enumerate(rows):
        s_at = t_at = 0
        for seg, i in enumerate(members, start=1):
            s, t = exs[i]
            out["input_ids"][r, s_at:s_at + len(s)] = s
            out["encoder_segment_ids"][r, s_at:s_at + len(s)] = seg
            out["labels"][r, t_at:t_at + len(t)] = t
            out["decoder_segment_ids"][r, t_at:t_at + len(t)] = seg
            where[i] = (r, t_at)
            s_at, t_at = s_at + len(s), t_at + len(t)
    return out, where


def model(backend: str, name: str = "tiny", converted: bool = True, **overrides):
    """(T5, its TokenNLL): plain, or converted (the twins swapped in; backend eager stays plain attention)."""
    torch.manual_seed(0)
    config = dataclasses.replace(T5Config.from_name(name, vocab_size=128, dropout_rate=0.0, **overrides),
                                 attention_backend=backend)
    m, loss = T5(config), TokenNLL()
    if converted:
        m, loss, _ = fast.apply(m, loss, device="cpu")
    return m, loss


def nll(m, loss, batch):
    return loss(*m.output_projection(m(**batch).hidden), batch["labels"])


def logits(m, batch):
    return m.logits(m(**batch).hidden)


SPANS_ALWAYS = "t5forge.model.fast.spans.SPAN_OVERHEAD_CELLS"  # 0: spans even for these short examples


@pytest.mark.parametrize("variant", ["plain", "sdpa", "sdpa-dense"])
@pytest.mark.parametrize("tied", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_batch(variant, tied, monkeypatch):
    monkeypatch.setattr(SPANS_ALWAYS, 0)
    if variant == "sdpa-dense":  # the dense block-diagonal mask the twins take on a GPU (spans are CPU-only)
        monkeypatch.setattr("t5forge.model.fast.attention.use_spans", lambda backend, device: False)
    m, loss_fn = model("sdpa", converted=variant != "plain", tie_word_embeddings=tied,
                       feed_forward_proj="relu" if tied else "gated-gelu")
    exs = examples(128)
    ref = nll(m, loss_fn, padded(exs))
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    batch, _ = packed(exs)
    loss = nll(m, loss_fn, batch)
    kinds = autograd_kinds(loss)
    assert ("_SpanAttentionBackward" in kinds) == (variant == "sdpa"), kinds
    grads = torch.autograd.grad(loss, list(m.parameters()))
    torch.testing.assert_close(loss, ref, **TOL)
    for (name, _), g, want in zip(m.named_parameters(), grads, ref_grads):
        assert (g - want).abs().max() <= 1e-5 * max(want.abs().max(), 1e-3), name
    assert all(g.abs().sum() > 0 for g in ref_grads)  # every parameter takes part (relative biases too)


@pytest.mark.parametrize("backend,converted", [("eager", False), ("sdpa", True), ("flex", True)])
def test_packed_logits_of_every_target_token_equal_the_padded_batch(backend, converted):
    m, _ = model(backend, converted=converted)
    m.eval()
    exs = examples(128, seed=1)
    batch, where = packed(exs)
    with torch.no_grad():
        ref = logits(m, padded(exs))
        out = logits(m, batch)
    for i, (_, t) in enumerate(exs):
        r, at = where[i]
        torch.testing.assert_close(out[r, at:at + len(t)], ref[i, :len(t)], **TOL)


@pytest.mark.parametrize("converted", [False, True])
def test_packed_rows_reach_beyond_the_bucket_range_of_one_example(converted):
    # Rows long enough that in-row distances fall into the log-spaced buckets: the translation
    # argument (same-example distances are the same in the row) must still give equal losses.
    m, loss_fn = model("sdpa", converted=converted, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    g = torch.Generator().manual_seed(2)
    exs = [(torch.randint(2, 128, (s,), generator=g), torch.randint(2, 128, (t,), generator=g))
           for s, t in [(30, 9), (25, 11), (40, 7)]]
    with torch.no_grad():
        ref = nll(m, loss_fn, padded(exs))
        loss = nll(m, loss_fn, packed(exs, rows=[[0, 1, 2]])[0])
    torch.testing.assert_close(loss, ref, **TOL)


def test_packed_shift_right_starts_every_example_with_the_start_token():
    m, _ = model("eager", converted=False)
    labels = torch.tensor([[5, 6, 7, 8, 9, -100]])
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    assert m.shift_right(labels, segments).tolist() == [[0, 5, 0, 7, 8, 0]]


def test_packed_batch_refuses_masks_alongside_segment_ids():
    m, _ = model("eager", converted=False)
    exs = examples(128)
    batch, _ = packed(exs)
    with pytest.raises(ValueError, match="no attention masks"):
        m(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="encoder_segment_ids and decoder_segment_ids"):
        m(batch["input_ids"], labels=batch["labels"], encoder_segment_ids=batch["encoder_segment_ids"])


@pytest.mark.parametrize("rows", [ROWS, [[0, 1, 2, 3, 4]], [[4, 0], [2], [3, 1]]])
def test_sdpa_spans_on_cpu_equal_the_padded_batch_and_the_dense_mask(rows, monkeypatch):
    # One row holding the whole batch (the CPU default with sdpa) and an unsorted placement too.
    monkeypatch.setattr(SPANS_ALWAYS, 0)
    exs = examples(128, seed=3)
    (ref_model, ref_loss), (m, loss_fn) = model("sdpa", converted=False), model("sdpa")
    batch, _ = packed(exs, rows=rows)
    ref = nll(ref_model, ref_loss, padded(exs))
    dense = nll(ref_model, ref_loss, batch)  # the plain model: the dense block-diagonal mask
    loss = nll(m, loss_fn, batch)
    assert autograd_kinds(loss) == {"_SpanAttentionBackward"}  # the span kernel ran, nothing else
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(dense, ref, **TOL)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref_grads = torch.autograd.grad(ref, list(ref_model.parameters()))
    for (name, _), g, want in zip(m.named_parameters(), grads, ref_grads):
        assert (g - want).abs().max() <= 1e-5 * max(want.abs().max(), 1e-3), name


def test_sdpa_spans_under_bf16_autocast_match_the_padded_batch(monkeypatch):
    monkeypatch.setattr(SPANS_ALWAYS, 0)
    exs = examples(128, seed=4)
    m, loss_fn = model("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = nll(m, loss_fn, padded(exs))
        ref_grad = torch.autograd.grad(ref, m.encoder.position.weight)[0]
        loss = nll(m, loss_fn, packed(exs, rows=[[0, 1, 2, 3, 4]])[0])
        grad = torch.autograd.grad(loss, m.encoder.position.weight)[0]
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0.0)
    assert (grad - ref_grad).norm() <= 0.05 * ref_grad.norm()


def test_sdpa_spans_with_attention_dropout_stay_inside_each_example():
    # Dropout takes the autograd path (F.scaled_dot_product_attention per example): an example's
    # output must depend on its own queries, keys and values only, and padding queries give 0.
    torch.manual_seed(0)
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    bias = AttentionBias("sdpa", dense=torch.randn(1, 2, 3, 3), spans=segment_spans(segments, segments))
    out = attend(q, k, v, bias, dropout_p=0.5)
    assert "_SpanAttentionBackward" not in autograd_kinds(out.sum())  # that kernel has no dropout
    assert not torch.equal(out, attend(q, k, v, bias))  # dropout applied
    assert (out[:, :, 5] == 0).all()
    out[:, :, :3].sum().backward()
    for t in (q, k, v):
        assert (t.grad[:, :, 3:] == 0).all() and t.grad[:, :, :3].abs().sum() > 0


def test_segment_spans_pair_each_example_with_its_own_keys():
    q = torch.tensor([[1, 1, 2, 0], [1, 2, 2, 2]])
    k = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 0, 0, 0]])
    assert segment_spans(q, q) == [(0, 0, 2, 0, 2), (0, 2, 3, 2, 3), (1, 0, 1, 0, 1), (1, 1, 4, 1, 4)]
    assert segment_spans(q, k) == [(0, 0, 2, 0, 3), (0, 2, 3, 3, 5), (1, 0, 1, 0, 2), (1, 1, 4, 2, 3)]
    with pytest.raises(ValueError, match="segment 1 is not contiguous"):
        segment_spans(torch.tensor([[1, 2, 1]]), torch.tensor([[1, 2, 1]]))


def test_span_attention_backward_passes_gradcheck():
    # Two rows, padding at the ends, a shared bias read at its top-left corners; double precision.
    g = torch.Generator().manual_seed(0)
    q_seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
    k_seg = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [1, 2, 2, 2, 0, 0, 0]])
    for keys, with_bias in [(q_seg, True), (k_seg, False)]:  # self-attention with a bias; cross without
        spans = segment_spans(q_seg, keys)
        q = torch.randn(2, 3, 6, 4, dtype=torch.double, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 3, keys.shape[1], 4, dtype=torch.double, generator=g, requires_grad=True)
                for _ in range(2))
        bias = torch.randn(1, 3, 4, 4, dtype=torch.double, generator=g, requires_grad=True) if with_bias else None
        assert torch.autograd.gradcheck(lambda *t: _SpanAttention.apply(*t, spans), (q, k, v, bias))


def test_each_attention_of_a_packed_row_takes_the_cheaper_layout():
    # SNI-like: long sources, few-token targets, all in one row. The encoder attends example by
    # example (spans); the decoder's short row is cheaper with dense block-diagonal masks (self- and
    # cross-attention here). Mixed, the result is still the padded batch's.
    g = torch.Generator().manual_seed(6)
    exs = [(torch.randint(2, 128, (s,), generator=g), torch.randint(2, 128, (t,), generator=g))
           for s, t in [(150, 3), (120, 5), (160, 2), (90, 4), (140, 3)]]
    m, loss_fn = model("sdpa")
    ref = nll(m, loss_fn, padded(exs))
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    loss = nll(m, loss_fn, packed(exs, rows=[[0, 1, 2, 3, 4]], width_pad=0)[0])
    kinds = autograd_kinds(loss)  # encoder: spans; decoder self-attention: the dense-mask kernel
    assert {"_SpanAttentionBackward", "_BiasedAttentionBackward"} <= kinds, kinds
    torch.testing.assert_close(loss, ref, **TOL)
    for (name, _), g, want in zip(m.named_parameters(), torch.autograd.grad(loss, list(m.parameters())), ref_grads):
        assert (g - want).abs().max() <= 1e-5 * max(want.abs().max(), 1e-3), name
    spans = [(0, 0, 150, 0, 150), (0, 150, 270, 150, 270)]
    assert cheaper_as_spans(spans, 1, 270, 270) == spans  # 40,900 + 2 x 4,096 cells < 72,900
    assert cheaper_as_spans([(0, 0, 3, 0, 3), (0, 3, 8, 3, 8)], 1, 8, 8) is None
