"""T5's span corruption ("random spans" denoising), vectorised in numpy.

Definition (t5.data.preprocessors: `random_spans_helper`, `random_spans_noise_mask`,
`noise_span_to_unique_sentinel`, `nonnoise_span_to_unique_sentinel`):
- a raw chunk of `raw_length` tokens (568 for inputs 512, density 0.15, mean span 3) gets
  `round(raw_length * density)` noise tokens in `round(noise / mean_span)` spans;
- noise and non-noise tokens are each cut into that many non-empty segments, uniformly at random,
  and interleaved starting with non-noise, so the chunk ends in a noise span;
- inputs: each noise span is replaced by the next sentinel (<extra_id_0>, <extra_id_1>, ...);
  targets: each non-noise span is replaced by the next sentinel, i.e. `<x0> span0 <x1> span1 ...`;
  both end with EOS. Every example then has exactly `input_length` / `target_length` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from t5forge.errors import T5ForgeError


def compute_input_and_target_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float):
    """(raw_tokens_length, targets_length) so that corrupted inputs are exactly `inputs_length` long.

    T5's `random_spans_helper` (Python float rounding): 512, 0.15, 3.0 -> (568, 114). It counts
    noise and spans as the mask does (`noise_span_counts`, which keeps at least one of each), so
    the planned length is the one the mask produces, also for very short inputs.
    """

    def lengths(tokens_length):
        num_noise, num_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
        # inputs: non-noise + one sentinel per span + EOS; targets: noise + one sentinel per span + EOS
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    # the corrupted length never falls as the raw length grows: take the longest raw length that fits
    # (below inputs_length when every span adds a sentinel, mean span 1)
    tokens_length = 2
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5's own tweak: at density 0.5 make targets as long as inputs (a rounder number), where the
    # shorter raw chunk still corrupts to inputs_length
    if noise_density == 0.5 and targets_length > inputs_length and lengths(tokens_length - 1)[0] == inputs_length:
        tokens_length -= 1
        targets_length = lengths(tokens_length)[1]
    return tokens_length, targets_length


def smallest_mean_span(input_length: int, noise_density: float, num_sentinels: int, start: float = 1.0):
    """The smallest mean span (a multiple of 0.1, from `start` on) whose span corruption of
    `input_length` tokens needs at most `num_sentinels` sentinels; None when even the longest fails."""

    def fits(tenths: int) -> bool:
        span = tenths / 10
        raw, _ = compute_input_and_target_lengths(input_length, noise_density, span)
        return noise_span_counts(raw, noise_density, span)[1] <= num_sentinels

    low, high = max(10, int(np.ceil(start * 10))), 10 * (input_length + 1)
    if num_sentinels < 1 or not fits(high):
        return None
    while low < high:  # fewer spans as the mean span grows
        middle = (low + high) // 2
        low, high = (middle + 1, high) if not fits(middle) else (low, middle)
    return low / 10


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float):
    """(num_noise_tokens, num_noise_spans) for a chunk, rounded in float64, half to even.

    T5's TF mask rounds in float32 while its length helper (`random_spans_helper`) rounds Python
    floats; where the two disagree the chunk does not corrupt to the planned length (input 172 at
    0.15: raw 190 x 0.15 is 28.5 in float64, rounded to 28, but 28.500002 in float32, rounded to 29).
    nanoT5 and HF's run_t5_mlm_flax round both in float64, as here, so every planned length is served;
    elsewhere (e.g. 512 at 0.15 / 3) the counts are T5's.
    """
    length = max(length, 2)
    num_noise = int(round(length * float(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)  # at least one noise and one non-noise token
    num_spans = int(round(num_noise / float(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def _random_segmentation(num_items: int, num_segments: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, num_segments) positive lengths summing to num_items; all segmentations equally likely.

    T5 shuffles `num_segments - 1` "segment starts here" flags over the `num_items - 1` gaps; taking
    the gaps with the smallest random keys picks the same uniform subset without a Python loop.
    """
    if num_segments == 1:
        return np.full((batch, 1), num_items, dtype=np.int64)
    keys = rng.random((batch, num_items - 1))
    cuts = np.sort(np.argpartition(keys, num_segments - 2, axis=1)[:, : num_segments - 1], axis=1) + 1
    edges = np.concatenate(
        [np.zeros((batch, 1), np.int64), cuts, np.full((batch, 1), num_items, np.int64)], axis=1
    )
    return np.diff(edges, axis=1)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator, batch: int = 1
) -> np.ndarray:
    """(batch, length) bool noise masks, T5's `random_spans_noise_mask` (without random roll)."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, batch, rng)
    nonnoise_lengths = _random_segmentation(max(length, 2) - num_noise, num_spans, batch, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=2).reshape(batch, 2 * num_spans)
    span_starts = np.cumsum(interleaved, axis=1)[:, :-1]
    starts = np.zeros((batch, max(length, 2)), dtype=np.int32)
    np.put_along_axis(starts, span_starts, 1, axis=1)
    is_noise = np.cumsum(starts, axis=1) % 2 == 1
    return is_noise[:, :length]


def _replace_spans(tokens: np.ndarray, span_mask: np.ndarray, vocab_size: int, eos_id: int) -> np.ndarray:
    """Replace each run of `span_mask` by one sentinel (<extra_id_0> = vocab_size - 1 first), append EOS."""
    batch = tokens.shape[0]
    first = span_mask & ~np.pad(span_mask, ((0, 0), (1, 0)))[:, :-1]
    sentinels = vocab_size - np.cumsum(first, axis=1)  # i-th run -> vocab_size - 1 - i
    keep = ~span_mask | first
    # every row keeps the same number of tokens, so the ragged selection reshapes to a matrix
    out = np.where(first, sentinels, tokens)[keep].reshape(batch, -1)
    return np.concatenate([out, np.full((batch, 1), eos_id, dtype=out.dtype)], axis=1)


@dataclass(frozen=True)
class SpanCorruption:
    """Turns (B, raw_length) token chunks into (inputs (B, input_length), targets (B, target_length))."""

    # one past <extra_id_0>: <extra_id_i> = vocab_size - 1 - i (Tokenizer.sentinel_end; the tokenizer's size
    # unless it has added tokens after the sentinels)
    vocab_size: int
    num_sentinels: int
    eos_id: int = 1
    input_length: int = 512
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    raw_length: int = field(init=False)
    target_length: int = field(init=False)
    num_noise_spans: int = field(init=False)

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise T5ForgeError(f"data.mlm_probability must be in (0, 1), got {self.noise_density}")
        if self.mean_noise_span_length < 1.0:
            raise T5ForgeError(f"data.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}")
        if self.input_length < 4:
            raise T5ForgeError(f"data.input_length must be at least 4, got {self.input_length}")
        raw, targets = compute_input_and_target_lengths(
            self.input_length, self.noise_density, self.mean_noise_span_length
        )
        num_noise, num_spans = noise_span_counts(raw, self.noise_density, self.mean_noise_span_length)
        if (raw - num_noise + num_spans + 1, num_noise + num_spans + 1) != (self.input_length, targets):
            # tiny lengths, where T5's mask clamps counts that its length helper does not
            raise T5ForgeError(
                f"data.input_length={self.input_length} is too short for noise density {self.noise_density} and "
                f"mean span {self.mean_noise_span_length}: use a longer input"
            )
        if num_spans > self.num_sentinels:
            # Refused rather than adapted: a silently longer span would be another objective than the
            # one configured (and T5 itself would run out of sentinels into ordinary token ids).
            span = smallest_mean_span(self.input_length, self.noise_density, self.num_sentinels,
                                      self.mean_noise_span_length)
            longer = f"data.mean_noise_span_length={span:g} or more (longer spans, as UL2's denoisers use), " if span else ""
            raise T5ForgeError(
                f"span corruption of {self.input_length} input tokens (noise density {self.noise_density}, mean span "
                f"{self.mean_noise_span_length:g}) needs {num_spans} sentinels but the tokenizer has only "
                f"{self.num_sentinels}: use {longer}a tokenizer with at least {num_spans} sentinels (`t5forge tokenizer "
                f"train --extra-ids {num_spans}`), or a shorter data.input_length"
            )
        object.__setattr__(self, "raw_length", raw)
        object.__setattr__(self, "target_length", targets)
        object.__setattr__(self, "num_noise_spans", num_spans)

    def __call__(self, chunks: np.ndarray, rng: np.random.Generator):
        chunks = np.asarray(chunks, dtype=np.int64)
        if chunks.ndim != 2 or chunks.shape[1] != self.raw_length:
            raise ValueError(f"expected chunks of shape (B, {self.raw_length}), got {chunks.shape}")
        mask = random_spans_noise_mask(
            self.raw_length, self.noise_density, self.mean_noise_span_length, rng, batch=chunks.shape[0]
        )
        inputs = _replace_spans(chunks, mask, self.vocab_size, self.eos_id)
        targets = _replace_spans(chunks, ~mask, self.vocab_size, self.eos_id)
        return inputs, targets

    # The pre-training loader's objective interface (data/loader.py; data/ul2.py has a mixture):
    # one kind of example, so every chunk has the same raw length and the data position no new part.
    @property
    def raw_lengths(self) -> tuple:
        return (self.raw_length,)

    def denoisers_of(self, seed: int, reader: int, first: int, count: int) -> np.ndarray:
        return np.zeros(count, dtype=np.int64)

    def batch(self, chunks, denoisers, rng: np.random.Generator) -> dict:
        inputs, targets = self(np.stack(chunks), rng)
        return {"input_ids": inputs, "labels": targets}

    def layout(self):
        return None
