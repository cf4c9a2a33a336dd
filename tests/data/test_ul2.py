"""UL2's mixture of denoisers on real C4 text with the real T5 vocabulary: every example rebuilds its
text, lengths, proportions, paradigm tokens, exact resume, bad mixtures, and long inputs."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from span_rebuild import rebuild

from t5forge.data.loader import build_pretrain_loader
from t5forge.data.span_corruption import SpanCorruption, smallest_mean_span
from t5forge.data.ul2 import (
    ALL_PARADIGM_TOKENS,
    DEFAULT_DENOISERS,
    build_mixture,
    mixture_lengths,
    parse_denoiser,
    parse_mixture,
)
from t5forge.errors import T5ForgeError
from t5forge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ul2_tokenizer(spiece_path):
    return load_tokenizer(spiece_path).with_added_tokens(ALL_PARADIGM_TOKENS)


def _ul2_loader(tokenizer, files, **options):
    options = {"batch_size": 8, "input_length": 128, "seed": 5, **options}
    return build_pretrain_loader(tokenizer=tokenizer, files=files, objective="ul2", **options)


def _take(loader, n):
    return [{k: v.clone() for k, v in b.items()} for b in itertools.islice(loader, n)]


def _rebuild_example(tokenizer, mixture, inputs, mask, labels, denoiser):
    """The text tokens an example was made from: sentinels filled back in (R, X) or prefix + target (S)."""
    spec = mixture.denoisers[denoiser]
    inputs = inputs[: int(mask.sum())]
    labels = [t for t in labels if t != -100]
    assert inputs[0] == tokenizer.added_token_id(spec.paradigm_token)
    if spec.kind == "S":
        assert inputs[-1] == labels[-1] == tokenizer.eos_id
        assert not any(tokenizer.is_sentinel(t) for t in inputs + labels)
        return inputs[1:-1] + labels[:-1]
    return rebuild(inputs[1:], labels, tokenizer)


def test_every_denoiser_rebuilds_the_c4_text_exactly(ul2_tokenizer, c4_train_file, c4_docs):
    """In corpus order, the examples of all seven denoisers rebuild the tokenized documents, token for
    token and in order: nothing is lost between chunks of different lengths."""
    loader = _ul2_loader(ul2_tokenizer, [c4_train_file])
    loader.extra_keys = ("denoiser",)
    mixture = loader.corruption
    batches = _take(loader, 12)
    stream = [t for ids in ul2_tokenizer.encode_batch(c4_docs[:300], add_eos=True) for t in ids]
    rebuilt, seen = [], Counter()
    for batch in batches:
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 128)
        assert batch["labels"].shape == (8, mixture.target_length)
        for i in range(8):
            d = int(batch["denoiser"][i])
            seen[d] += 1
            tokens = _rebuild_example(ul2_tokenizer, mixture, batch["input_ids"][i].tolist(),
                                      batch["attention_mask"][i], batch["labels"][i].tolist(), d)
            assert len(tokens) == mixture.raw_lengths[d]
            if mixture.denoisers[d].kind != "S":  # span corruption fills the encoder exactly
                assert bool(batch["attention_mask"][i].all())
            rebuilt += tokens
    assert sorted(seen) == list(range(7)), seen  # 96 examples: every denoiser made some
    assert rebuilt == stream[: len(rebuilt)]
    # padding is pad in the inputs and -100 in the targets, nowhere else
    assert bool(((batch["input_ids"] == 0) == (batch["attention_mask"] == 0)).all())


def test_lengths_fit_at_every_input_length(ul2_tokenizer):
    """Each denoiser fills input_length (S: at most) and never outgrows the planned target length,
    which one of them reaches."""
    for length in (16, 64, 128, 512):
        mixture = build_mixture(ul2_tokenizer, length, DEFAULT_DENOISERS)
        assert mixture_lengths(length, mixture.denoisers) == (mixture.raw_lengths, mixture.target_length)
        rng = np.random.default_rng(length)
        longest = 0
        for d, raw in enumerate(mixture.raw_lengths):
            chunks = [np.arange(3, 3 + raw) + k for k in range(4)]
            out = mixture.batch(chunks, [d] * 4, rng)
            assert out["input_ids"].shape == (4, length) and out["labels"].shape == (4, mixture.target_length)
            used = (out["labels"] != -100).sum(axis=1)
            longest = max(longest, int(used.max()))
            if mixture.denoisers[d].kind == "S":
                assert (out["attention_mask"].sum(axis=1) <= length).all()
            else:
                assert (out["attention_mask"] == 1).all()
        assert longest == mixture.target_length, length


def test_s_denoiser_split_points_follow_its_rate(ul2_tokenizer):
    """S(r): the target is about a fraction r of the chunk, the prefix uniform in [(1 - 2r)(N - 1), N - 1]."""
    mixture = build_mixture(ul2_tokenizer, 128, ["S:0.25:1"])
    raw = mixture.raw_lengths[0]
    out = mixture.batch([np.arange(3, 3 + raw)] * 4000, [0] * 4000, np.random.default_rng(0))
    targets = (out["labels"] != -100).sum(axis=1) - 1  # EOS
    prefixes = out["attention_mask"].sum(axis=1) - 2  # paradigm token, EOS
    assert ((prefixes + targets) == raw).all()
    assert prefixes.min() == round(0.5 * (raw - 1)) and prefixes.max() == raw - 1
    assert abs(targets.mean() / raw - 0.25) < 0.01


def test_proportions_follow_the_weights(ul2_tokenizer):
    """20,000 chunks: each denoiser's count is within 4 standard deviations of its share (a wrong share,
    e.g. S at 1/7 instead of 1/5, is 14 deviations off)."""
    mixture = build_mixture(ul2_tokenizer, 128, DEFAULT_DENOISERS)
    assert mixture.shares == pytest.approx([2 / 15] * 6 + [0.2])
    n = 20_000
    drawn = mixture.denoisers_of(seed=1, reader=0, first=0, count=n)
    counts = np.bincount(drawn, minlength=7)
    for count, share in zip(counts, mixture.shares):
        assert abs(count - n * share) < 4 * np.sqrt(n * share * (1 - share)), (counts, mixture.shares)
    # any window of the sequence is the same draw, whoever asks for it (a resumed reader asks mid-way)
    assert (mixture.denoisers_of(1, 0, 1500, 700) == drawn[1500:2200]).all()
    assert not (mixture.denoisers_of(1, 1, 0, 200) == drawn[:200]).all()  # readers draw their own


def test_paradigm_tokens_follow_the_sentinels_and_are_saved(ul2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = ul2_tokenizer
    assert [tok.added_token_id(t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [32100, 32101, 32102]
    assert tok.vocab_size == 32103 and tok.sentinel_id(0) == 32099 and tok.sentinel_id(99) == 32000
    ids = tok.encode("[S2S] The cat <extra_id_0> mat.")
    assert ids[0] == 32102 and 32099 in ids
    assert tok.decode(ids, skip_special_tokens=False).startswith("[S2S] The cat")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.added_tokens == ALL_PARADIGM_TOKENS and again.encode("[S2S] The cat <extra_id_0> mat.") == ids
    assert again.with_added_tokens(ALL_PARADIGM_TOKENS) is again  # nothing added twice
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(auto) == 32103 and auto.encode("[S2S] The cat <extra_id_0> mat.") == ids
    assert auto.convert_tokens_to_ids(list(ALL_PARADIGM_TOKENS)) == [32100, 32101, 32102]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_very_next_batch(ul2_tokenizer, c4_train_file, num_workers, tmp_path):
    make = lambda: _ul2_loader(ul2_tokenizer, [c4_train_file], batch_size=4, num_workers=num_workers,  # noqa: E731
                               shuffle_buffer=10)
    straight = _take(make(), 8)
    first = make()
    head = _take(first, 3)
    torch.save(first.state_dict(), tmp_path / "data.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "data.pt"))
    tail = _take(resumed, 5)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(straight, head + tail) for k in a)
    # the mixture is part of the position: another one (or plain span corruption) is refused
    other = _ul2_loader(ul2_tokenizer, [c4_train_file], batch_size=4, num_workers=num_workers, shuffle_buffer=10,
                        ul2_denoisers=["R:3:0.15:1", "S:0.25:1"])
    with pytest.raises(T5ForgeError, match="objective"):
        other.load_state_dict(first.state_dict())
    plain = build_pretrain_loader(tokenizer=ul2_tokenizer, files=[c4_train_file], batch_size=4, input_length=128,
                                  seed=5, num_workers=num_workers, shuffle_buffer=10)
    with pytest.raises(T5ForgeError, match="objective"):
        plain.load_state_dict(first.state_dict())


@pytest.mark.parametrize("text, message", [
    ("R:3:0.15", "write KIND:MEAN_SPAN:RATE:WEIGHT"),
    ("Q:3:0.15:1", "write KIND:MEAN_SPAN:RATE:WEIGHT"),
    ("X:3:half:1", "must be numbers"),
    ("X:0.5:0.5:1", "mean span must be >= 1"),
    ("R:3:1.5:1", r"noise density must be in \(0, 1\)"),
    ("S:0.75:1", r"rate must be in \(0, 0.5\]"),
    ("S:0.25:0", "weight must be > 0"),
])
def test_bad_denoisers_are_refused_with_how_to_write_them(text, message):
    with pytest.raises(T5ForgeError, match=message):
        parse_denoiser(text)
    from t5forge.config_files import load_config

    with pytest.raises(T5ForgeError, match=f"data.ul2_denoisers=.*{message}"):
        load_config(["task=pt_tiny", "data.objective=ul2", f"data.ul2_denoisers=[R:3:0.15:1,{text}]"])


def test_the_defaults_are_the_papers_seven():
    names = [(d.kind, d.mean_span, d.rate, d.paradigm_token) for d in parse_mixture(DEFAULT_DENOISERS)]
    assert names == [("R", 3, 0.15, "[NLU]"), ("R", 8, 0.15, "[NLU]"), ("X", 3, 0.5, "[NLG]"), ("X", 8, 0.5, "[NLG]"),
                     ("X", 64, 0.15, "[NLG]"), ("X", 64, 0.5, "[NLG]"), ("S", None, 0.25, "[S2S]")]


def test_long_inputs_name_the_smallest_mean_span_and_the_sentinels_needed(ul2_tokenizer):
    """4,096 tokens at 15% with T5's 100 sentinels: mean span 3 needs 227 spans; 7.1 is the shortest
    that fits, and the error says so (and how many sentinels a tokenizer would need instead)."""
    with pytest.raises(T5ForgeError, match=r"needs 227 sentinels .* data.mean_noise_span_length=7.1 or more .*"
                                           r"--extra-ids 227"):
        SpanCorruption(vocab_size=32100, num_sentinels=100, input_length=4096)
    assert smallest_mean_span(4096, 0.15, 100) == 7.1
    assert SpanCorruption(vocab_size=32100, num_sentinels=100, input_length=4096, mean_noise_span_length=7.1)
    with pytest.raises(T5ForgeError, match="needs 101 sentinels"):
        SpanCorruption(vocab_size=32100, num_sentinels=100, input_length=4096, mean_noise_span_length=7.0)
    # more sentinels in the vocabulary serve T5's mean span 3
    assert SpanCorruption(vocab_size=32100, num_sentinels=227, input_length=4096).num_noise_spans == 227
    # UL2: a span denoiser with too many spans for the sentinels runs with the shortest mean span that
    # fits (X(3, 0.5) at nanoT5's 512 inputs makes 127 spans); the others keep theirs
    mixture = build_mixture(ul2_tokenizer, 512, DEFAULT_DENOISERS)
    spans = [sc.mean_noise_span_length if sc else None for sc in mixture._spans]
    assert spans == [3, 8, 4.1, 8, 64, 64, None]
    assert max(sc.num_noise_spans for sc in mixture._spans if sc) == 100
    assert "mean span 4.1, not 3: the shortest that fits 100 sentinels" in mixture.describe()[2]
    long = build_mixture(ul2_tokenizer, 4096, DEFAULT_DENOISERS)
    assert [sc.mean_noise_span_length for sc in long._spans if sc] == [7.1, 8, 39.8, 39.8, 64, 64]
    assert mixture_lengths(4096, long.denoisers, 100) == (long.raw_lengths, long.target_length)


def test_preview_shows_and_labels_every_denoiser(c4_train_file, spiece_path, capsys):
    from t5forge.cli import main

    items = ["data", "preview", "task=pt_tiny", "data.objective=ul2", f"data.train_files=[{c4_train_file}]",
             f"data.tokenizer={spiece_path}"]
    assert main([*items, "--per-denoiser", "1"]) == 0
    out = capsys.readouterr().out
    labels = [line.split("[", 1)[1].split("]]")[0] + "]" for line in out.splitlines() if line.startswith("=== batch")]
    assert sorted(labels) == sorted(f"{d.name} {d.paradigm_token}" for d in parse_mixture(DEFAULT_DENOISERS))
    assert "UL2 mixture of 7 denoisers: input 64 tokens" in out and "S(r=0.25) [S2S] 20.0%" in out
    for block in out.split("=== batch")[1:]:  # each example's input decodes with its paradigm token first
        token, text = block.split("]]")[0].rsplit("[", 1)[1], block.split("--- input:\n")[1]
        assert text.startswith(f"[{token}]"), block
    assert main([*items, "-n", "2"]) == 0
    assert capsys.readouterr().out.count("=== batch 0 example") == 2
    assert main(["data", "preview", "task=pt_tiny", "--per-denoiser", "1", f"data.train_files=[{c4_train_file}]",
                 f"data.tokenizer={spiece_path}"]) == 2
    assert "--per-denoiser needs data.objective=ul2" in capsys.readouterr().err
