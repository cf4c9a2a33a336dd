"""Span corruption on real C4 text with the real T5 vocabulary: lengths, exact reconstruction, statistics."""

import itertools
from collections import Counter

import numpy as np
import pytest
from span_rebuild import rebuild

from t5forge.data.loader import build_pretrain_loader
from t5forge.data.span_corruption import (
    SpanCorruption,
    compute_input_and_target_lengths,
    random_spans_noise_mask,
)
from t5forge.errors import T5ForgeError


def _reference_chunks(docs, tokenizer, raw_length, count):
    stream = [tok for ids in tokenizer.encode_batch(docs, add_eos=True) for tok in ids]
    return [stream[i * raw_length : (i + 1) * raw_length] for i in range(count)]


def test_t5_lengths():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)  # nanoT5 / T5 numbers
    for inputs_length, density, span in [(512, 0.15, 3.0), (128, 0.15, 3.0), (1024, 0.3, 8.0), (512, 0.5, 8.0)]:
        sc = SpanCorruption(vocab_size=32100, num_sentinels=100, input_length=inputs_length,
                            noise_density=density, mean_noise_span_length=span)
        inputs, targets = sc(np.arange(3, 3 + 2 * sc.raw_length).reshape(2, -1), np.random.default_rng(0))
        assert inputs.shape == (2, inputs_length) and targets.shape == (2, sc.target_length)


def test_real_c4_examples_are_exact_and_rebuild_the_raw_chunks(t5_tokenizer, c4_train_file, c4_docs):
    loader = build_pretrain_loader(tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=16, seed=3)
    batches = list(itertools.islice(loader, 6))
    reference = _reference_chunks(c4_docs[:200], t5_tokenizer, 568, 6 * 16)
    for b, batch in enumerate(batches):
        assert batch["input_ids"].shape == (16, 512) and batch["labels"].shape == (16, 114)
        assert batch["input_ids"].dtype == batch["labels"].dtype == __import__("torch").int64
        for i in range(16):
            rebuilt = rebuild(batch["input_ids"][i].tolist(), batch["labels"][i].tolist(), t5_tokenizer)
            # tokenized documents joined with EOS and cut into 568-token chunks, in order
            assert rebuilt == reference[b * 16 + i]


def test_noise_statistics_over_many_chunks(t5_tokenizer):
    sc = SpanCorruption(vocab_size=t5_tokenizer.vocab_size, num_sentinels=t5_tokenizer.num_sentinels)
    rng = np.random.default_rng(0)
    mask = random_spans_noise_mask(sc.raw_length, 0.15, 3.0, rng, batch=2000)
    assert abs(mask.mean() - 0.15) < 0.005
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    assert abs(mask.sum() / starts.sum() - 3.0) < 0.1
    assert not mask[:, 0].any() and mask[:, -1].all()  # T5: begins with non-noise, ends with noise


def _t5_reference_mask(length, density, mean_span, rng):
    """T5's random_spans_noise_mask written the way T5 writes it (shuffle one segment flag vector)."""
    num_noise = min(max(int(np.round(length * density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_span)), 1)

    def segmentation(items, segments):
        flags = np.arange(items - 1) < segments - 1
        rng.shuffle(flags)
        segment_id = np.cumsum(np.pad(flags, [[1, 0]]))
        return np.bincount(segment_id)

    interleaved = np.stack([segmentation(length - num_noise, num_spans), segmentation(num_noise, num_spans)], 1)
    starts = np.zeros(length, dtype=int)
    starts[np.cumsum(interleaved.reshape(-1))[:-1]] = 1
    return np.cumsum(starts) % 2 == 1


def test_span_length_distribution_matches_t5_algorithm():
    rng = np.random.default_rng(1)
    ours = random_spans_noise_mask(568, 0.15, 3.0, rng, batch=3000)
    theirs = np.stack([_t5_reference_mask(568, 0.15, 3.0, rng) for _ in range(3000)])

    def span_lengths(masks):
        lengths = Counter()
        for row in masks:
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
            lengths.update((edges[1::2] - edges[::2]).tolist())
        return lengths

    a, b = span_lengths(ours), span_lengths(theirs)
    assert sum(a.values()) == sum(b.values()) == 3000 * 28
    for length in range(1, 8):  # the common lengths: frequencies agree within sampling noise
        assert abs(a[length] - b[length]) < 5 * np.sqrt(b[length]) + 5, (length, a[length], b[length])
    # noise is spread over positions as in T5 (compare the two halves of the chunk)
    assert abs(ours[:, :284].mean() - theirs[:, :284].mean()) < 0.005


def test_too_few_sentinels_and_bad_settings():
    with pytest.raises(T5ForgeError, match="needs 28 sentinels but the tokenizer has only 10"):
        SpanCorruption(vocab_size=1000, num_sentinels=10)
    with pytest.raises(T5ForgeError, match="mlm_probability"):
        SpanCorruption(vocab_size=32100, num_sentinels=100, noise_density=1.5)


@pytest.mark.parametrize("density, span", [(0.15, 3.0), (0.05, 3.0), (0.3, 8.0), (0.5, 8.0), (0.5, 3.0), (0.15, 1.0)])
def test_every_input_length_is_served(density, span):
    """Lengths are planned and masked with the same float64 counts: no length is refused (172 at
    0.15 / 3 was, under float32 mask rounding) and each corrupts to exactly the planned shapes."""
    for length in [*range(4, 400), 512, 568, 1024]:
        sc = SpanCorruption(vocab_size=32100, num_sentinels=1000, input_length=length,
                            noise_density=density, mean_noise_span_length=span)
        inputs, targets = sc(np.arange(3, 3 + 2 * sc.raw_length).reshape(2, -1), np.random.default_rng(length))
        assert inputs.shape == (2, length) and targets.shape == (2, sc.target_length), (length, density, span)
    assert compute_input_and_target_lengths(172, 0.15, 3.0) == (190, 38)
