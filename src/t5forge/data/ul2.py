"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms"), in numpy.

Each example is made by one denoiser, drawn with the mixture's proportions:
- R (regular) and X (extreme) denoisers are T5's span corruption (`span_corruption`) with their own
  mean span length mu and noise density r: R = short spans at 15%, X = long spans or a high rate;
- the S (sequential) denoiser is a prefix LM: a chunk is split at a random point, the input is the
  prefix and the target the rest. The split follows T5's `random_prefix_noise_mask`: the prefix
  length is uniform in [round((1 - 2r)(N - 1)), N - 1] for an N-token chunk, so about a fraction r
  of the chunk is target (r = 0.5: anywhere; UL2's S-denoiser takes r = 0.25);
- the input starts with the denoiser's paradigm token: [NLU] for R, [NLG] for X, [S2S] for S (the
  tokens of the released UL2 checkpoints), which the tokenizer holds after its sentinels.

Lengths: every example has `input_length` encoder tokens (paradigm token included) and the batch's
targets are as long as the longest any denoiser makes; shorter targets are padded with -100 and S
inputs, whose prefix varies, with pad (masked by `attention_mask`). Each denoiser reads a chunk of
its own raw length, planned like T5's `random_spans_helper` for input_length - 1 tokens (R at 128
inputs: 141 text tokens; X mu=64 r=0.5: 250; S: 127), so no text is cut away and dropped.

Sentinels: a span denoiser whose spans outnumber the tokenizer's sentinels (X mu=3 r=0.5 makes 127
spans at 512 inputs; T5's vocabulary has 100) gets the shortest mean span, in steps of 0.1, that
fits (4.1 there): same noise density, longer spans, the paradigm token unchanged, and the start-up
log and `data preview` say so. UL2's own code instead ran out of sentinels into ordinary token ids
(T5's `noise_span_to_unique_sentinel` counts down from the top without a bound). Plain span
corruption refuses instead (data/span_corruption.py): there mu is the experiment.

The denoiser of the n-th chunk a reader cuts is drawn from an RNG keyed by (seed, reader, n // 1024),
so a reader's position (which gives n) restores the denoiser sequence on resume.

A denoiser is written `KIND:MU:R:WEIGHT` (R and X) or `S:R:WEIGHT` (S), e.g. "R:3:0.15:2"; weights
are normalised to proportions. DEFAULT_DENOISERS is the paper's final mixture of seven: R (3, 0.15),
(8, 0.15); X (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5); S (0.25); the S-denoiser takes 20% of the
examples (the share reported for UL2; the paper's appendix code samples its tasks uniformly unless
given rates) and the six span denoisers share the rest equally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from t5forge.data.span_corruption import (
    SpanCorruption,
    compute_input_and_target_lengths,
    noise_span_counts,
    smallest_mean_span,
)
from t5forge.errors import T5ForgeError

PARADIGM_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}
ALL_PARADIGM_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # added to the tokenizer in this order, whatever the mixture
DEFAULT_DENOISERS = ("R:3:0.15:2", "R:8:0.15:2", "X:3:0.5:2", "X:8:0.5:2", "X:64:0.15:2", "X:64:0.5:2", "S:0.25:3")
CHOICE_GROUP = 1024  # chunks whose denoisers are drawn at once


@dataclass(frozen=True)
class Denoiser:
    kind: str  # "R", "X" or "S"
    rate: float  # noise density r (S: the mean fraction of a chunk that is target)
    weight: float
    mean_span: Optional[float] = None  # mu; None for S

    @property
    def paradigm_token(self) -> str:
        return PARADIGM_TOKENS[self.kind]

    @property
    def name(self) -> str:
        if self.kind == "S":
            return f"S(r={self.rate:g})"
        return f"{self.kind}(mu={self.mean_span:g}, r={self.rate:g})"


def parse_denoiser(text: str) -> Denoiser:
    """A Denoiser from "R:3:0.15:2" / "X:64:0.5:1" / "S:0.25:3"; a T5ForgeError saying how to write it."""
    how = "write KIND:MEAN_SPAN:RATE:WEIGHT for R and X (e.g. R:3:0.15:2) or S:RATE:WEIGHT (e.g. S:0.25:3)"
    parts = str(text).strip().split(":")
    kind = parts[0].strip().upper() if parts else ""
    if kind not in PARADIGM_TOKENS or len(parts) != (3 if kind == "S" else 4):
        raise T5ForgeError(f"denoiser {text!r}: {how}")
    try:
        numbers = [float(p) for p in parts[1:]]
    except ValueError:
        raise T5ForgeError(f"denoiser {text!r}: its fields must be numbers; {how}") from None
    if kind == "S":
        (rate, weight), span = numbers, None
        if not 0.0 < rate <= 0.5:
            raise T5ForgeError(f"denoiser {text!r}: the S-denoiser's rate must be in (0, 0.5] (the prefix takes "
                               "at least half of the chunk on average)")
    else:
        span, rate, weight = numbers
        if span < 1.0:
            raise T5ForgeError(f"denoiser {text!r}: the mean span must be >= 1")
        if not 0.0 < rate < 1.0:
            raise T5ForgeError(f"denoiser {text!r}: the noise density must be in (0, 1)")
    if not weight > 0.0:
        raise T5ForgeError(f"denoiser {text!r}: the weight must be > 0")
    return Denoiser(kind=kind, rate=rate, weight=weight, mean_span=span)


def parse_mixture(texts) -> tuple[Denoiser, ...]:
    if not texts:
        raise T5ForgeError("the UL2 mixture is empty: give at least one denoiser, e.g. [R:3:0.15:1,S:0.25:1]")
    return tuple(parse_denoiser(t) for t in texts)


def mixture_problem(texts) -> Optional[str]:
    """What is wrong with a list of denoiser strings (the config key's rule), or None."""
    try:
        parse_mixture(texts)
    except T5ForgeError as err:
        return f"must be a list of denoisers: {err}"
    return None


def prefix_bounds(raw_length: int, rate: float) -> tuple[int, int]:
    """(fewest, most) prefix tokens of the S-denoiser on a raw_length chunk (T5's random_prefix_noise_mask)."""
    most = raw_length - 1
    fewest = min(most, max(1, int(round((1.0 - 2.0 * rate) * most))))
    return fewest, most


def fitted_mean_span(denoiser: Denoiser, input_length: int, num_sentinels: int) -> Optional[float]:
    """The mean span a span denoiser runs with: its own, or the shortest that needs no more than
    `num_sentinels` sentinels (see the module docstring); None for S."""
    if denoiser.kind == "S":
        return None
    raw, _ = compute_input_and_target_lengths(input_length - 1, denoiser.rate, denoiser.mean_span)
    if noise_span_counts(raw, denoiser.rate, denoiser.mean_span)[1] <= num_sentinels:
        return denoiser.mean_span
    fitted = smallest_mean_span(input_length - 1, denoiser.rate, num_sentinels, denoiser.mean_span)
    if fitted is None:
        raise T5ForgeError(f"UL2 denoiser {denoiser.name} (data.ul2_denoisers) cannot fit {input_length} input tokens "
                           f"into {num_sentinels} sentinels at any mean span; use a tokenizer with more sentinels")
    return fitted


def denoiser_lengths(denoiser: Denoiser, input_length: int, num_sentinels: int) -> tuple[int, int]:
    """(raw text tokens, longest target incl. EOS) of one denoiser at `input_length` encoder tokens
    (one of them the paradigm token)."""
    if denoiser.kind == "S":
        raw = input_length - 1  # paradigm token + prefix (at most raw - 1) + EOS
        fewest, _ = prefix_bounds(raw, denoiser.rate)
        return raw, raw - fewest + 1
    span = fitted_mean_span(denoiser, input_length, num_sentinels)
    return compute_input_and_target_lengths(input_length - 1, denoiser.rate, span)


def mixture_lengths(input_length: int, denoisers, num_sentinels: int = 100) -> tuple[tuple[int, ...], int]:
    """(each denoiser's raw length, the batch's target length: the longest target of any), with a
    tokenizer of `num_sentinels` sentinels (T5's 100 by default)."""
    if input_length < 8:
        raise T5ForgeError(f"data.input_length must be at least 8 for UL2, got {input_length}")
    lengths = [denoiser_lengths(d, input_length, num_sentinels) for d in denoisers]
    return tuple(raw for raw, _ in lengths), max(target for _, target in lengths)


@dataclass(frozen=True)
class UL2Mixture:
    """Chunks of each denoiser's raw length -> dict(input_ids (B, L), attention_mask (B, L),
    labels (B, T), denoiser (B,)), T = target_length, -100 and pad where an example is shorter."""

    denoisers: tuple
    sentinel_end: int  # one past <extra_id_0> (Tokenizer.sentinel_end)
    num_sentinels: int
    paradigm_ids: tuple  # one id per denoiser
    eos_id: int = 1
    pad_id: int = 0
    input_length: int = 512
    raw_lengths: tuple = field(init=False)
    target_length: int = field(init=False)
    _spans: tuple = field(init=False, repr=False)
    _shares: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        raws, target = mixture_lengths(self.input_length, self.denoisers, self.num_sentinels)
        spans = []
        for d in self.denoisers:
            if d.kind == "S":
                spans.append(None)
                continue
            try:
                spans.append(SpanCorruption(
                    vocab_size=self.sentinel_end, num_sentinels=self.num_sentinels, eos_id=self.eos_id,
                    input_length=self.input_length - 1, noise_density=d.rate,
                    mean_noise_span_length=fitted_mean_span(d, self.input_length, self.num_sentinels)))
            except T5ForgeError as err:
                raise T5ForgeError(f"UL2 denoiser {d.name} (data.ul2_denoisers): {err}") from None
        weights = np.array([d.weight for d in self.denoisers], dtype=np.float64)
        object.__setattr__(self, "raw_lengths", raws)
        object.__setattr__(self, "target_length", target)
        object.__setattr__(self, "_spans", tuple(spans))
        object.__setattr__(self, "_shares", weights / weights.sum())

    @property
    def shares(self) -> tuple:
        return tuple(float(s) for s in self._shares)

    def describe(self) -> list[str]:
        """One line per denoiser: name, paradigm token, share, raw length, longest target."""
        lines = []
        for d, share, raw, sc in zip(self.denoisers, self._shares, self.raw_lengths, self._spans):
            if sc is None:
                what = f"prefix LM of {raw} text tokens, target up to {raw - prefix_bounds(raw, d.rate)[0] + 1}"
            else:
                what = f"{raw} text tokens -> {sc.num_noise_spans} spans, target {sc.target_length}"
                if sc.mean_noise_span_length != d.mean_span:
                    what += (f" (mean span {sc.mean_noise_span_length:g}, not {d.mean_span:g}: the shortest "
                             f"that fits {self.num_sentinels} sentinels)")
            lines.append(f"{d.name} {d.paradigm_token} {share:.1%}: {what}")
        return lines

    def denoisers_of(self, seed: int, reader: int, first: int, count: int) -> np.ndarray:
        """The denoiser index of chunks first .. first + count - 1 of a reader."""
        out, n = np.empty(count, dtype=np.int64), first
        while n < first + count:
            group = n // CHOICE_GROUP
            rng = np.random.default_rng([seed, reader, group, 3])
            drawn = rng.choice(len(self.denoisers), size=CHOICE_GROUP, p=self._shares)
            stop = min(first + count, (group + 1) * CHOICE_GROUP)
            out[n - first: stop - first] = drawn[n - group * CHOICE_GROUP: stop - group * CHOICE_GROUP]
            n = stop
        return out

    def batch(self, chunks, denoisers, rng: np.random.Generator) -> dict:
        """Examples from `chunks` (a list of 1-d token arrays, chunk i of length raw_lengths[denoisers[i]])."""
        denoisers = np.asarray(denoisers, dtype=np.int64)
        size, length = len(chunks), self.input_length
        inputs = np.full((size, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((size, length), dtype=np.int64)
        labels = np.full((size, self.target_length), -100, dtype=np.int64)
        for d in np.unique(denoisers):  # in index order: the rng is drawn from in a fixed order
            rows = np.flatnonzero(denoisers == d)
            stacked = np.stack([np.asarray(chunks[r], dtype=np.int64) for r in rows])
            if stacked.shape[1] != self.raw_lengths[d]:
                raise ValueError(f"denoiser {d} expects chunks of {self.raw_lengths[d]} tokens, got {stacked.shape[1]}")
            inputs[rows, 0] = self.paradigm_ids[d]
            sc = self._spans[d]
            if sc is not None:
                corrupted, targets = sc(stacked, rng)
                inputs[rows, 1:] = corrupted
                mask[rows] = 1
                labels[rows, : targets.shape[1]] = targets
                continue
            fewest, most = prefix_bounds(stacked.shape[1], self.denoisers[d].rate)
            prefixes = rng.integers(fewest, most, size=len(rows), endpoint=True)
            for row, tokens, p in zip(rows, stacked, prefixes):
                inputs[row, 1: p + 1] = tokens[:p]
                inputs[row, p + 1] = self.eos_id
                mask[row, : p + 2] = 1
                labels[row, : len(tokens) - p] = tokens[p:]
                labels[row, len(tokens) - p] = self.eos_id
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels, "denoiser": denoisers}

    def layout(self) -> list[str]:
        """What a saved data position depends on (a resume with another mixture is refused)."""
        return [f"{d.name}:{d.weight:g}" for d in self.denoisers]


def build_mixture(tokenizer, input_length: int, denoiser_texts) -> UL2Mixture:
    """The mixture of `denoiser_texts` for a tokenizer that holds the paradigm tokens."""
    denoisers = parse_mixture(denoiser_texts)
    missing = [t for t in ALL_PARADIGM_TOKENS if t not in tokenizer.added_tokens]
    if missing:
        raise T5ForgeError(f"the tokenizer {tokenizer.source} lacks UL2's paradigm tokens {', '.join(missing)}; "
                           "use tokenizer.with_added_tokens(ALL_PARADIGM_TOKENS)")
    return UL2Mixture(
        denoisers=denoisers, sentinel_end=tokenizer.sentinel_end, num_sentinels=tokenizer.num_sentinels,
        paradigm_ids=tuple(tokenizer.added_token_id(d.paradigm_token) for d in denoisers),
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, input_length=input_length,
    )
