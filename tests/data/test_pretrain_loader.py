"""The pre-training loader on real C4: determinism, exact resume with workers, rank x worker sharding,
held-out batches, and the Hub code path offline through a local folder laid out like allenai/c4."""

import gzip
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from t5forge.data.loader import ReaderStream, build_pretrain_loader
from t5forge.data.sources import TextSource
from t5forge.data.span_corruption import SpanCorruption
from t5forge.errors import T5ForgeError


def _write_jsonl_gz(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    return path


def _take(loader, n):
    return [{k: v.clone() for k, v in b.items()} for b in itertools.islice(loader, n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture()
def small_corpus(tmp_path, c4_docs):
    """Three real-C4 jsonl.gz shards (60 documents in all)."""
    return [_write_jsonl_gz(tmp_path / f"part-{i}.json.gz", c4_docs[i * 20 : (i + 1) * 20]) for i in range(3)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_very_next_batch(t5_tokenizer, c4_train_file, num_workers, tmp_path):
    make = lambda: build_pretrain_loader(  # noqa: E731
        tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=4, seed=7, num_workers=num_workers
    )
    straight = _take(make(), 8)
    first = make()
    head = _take(first, 3)  # odd: the next batch comes from the other worker
    torch.save(first.state_dict(), tmp_path / "data.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "data.pt"))
    tail = _take(resumed, 5)
    assert _same(straight, head + tail)
    # and the position keeps advancing across a second resume
    again = make()
    again.load_state_dict(resumed.state_dict())
    assert _same(_take(make(), 10)[8:], _take(again, 2))


def test_same_seed_same_batches_other_seed_other_masks(t5_tokenizer, c4_train_file):
    make = lambda seed: build_pretrain_loader(tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=4, seed=seed)  # noqa: E731
    a, b, c = _take(make(1), 2), _take(make(1), 2), _take(make(2), 2)
    assert _same(a, b)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


def test_resume_with_other_lengths_seed_or_buffer_is_refused_naming_the_keys(t5_tokenizer, c4_train_file):
    """Another worker count or world size is re-dealt (tests/data/test_redeal.py); what a position
    counts in (chunks of data.input_length, cut and shuffled by the seed and buffer) must stay."""
    make = lambda **kw: build_pretrain_loader(tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=4, **kw)  # noqa: E731
    loader = make(input_length=64)
    _take(loader, 1)
    with pytest.raises(T5ForgeError, match=r"text tokens per example \(from data.input_length\) 70 -> 568 since"):
        make().load_state_dict(loader.state_dict())
    with pytest.raises(T5ForgeError, match=r"seed 0 -> 3, data.shuffle_buffer 0 -> 10 since the checkpoint"):
        make(input_length=64, seed=3, shuffle_buffer=10).load_state_dict(loader.state_dict())


def _documents_read(source, reader, num_readers):
    corruption = SpanCorruption(vocab_size=32100, num_sentinels=100)
    stream = ReaderStream(source, None, corruption, 1, 0, reader, num_readers, train=True)
    texts = []
    for text, _, _, name in stream._documents((), (0, 0, 0, 0, 0)):
        if text is None:
            continue
        if name[0] > 0:  # one epoch
            break
        texts.append(text)
    return texts


@pytest.mark.parametrize("layout", ["one_file", "three_files"])
def test_two_ranks_two_workers_read_every_document_once_per_epoch(small_corpus, c4_docs, layout):
    files = small_corpus[:1] if layout == "one_file" else small_corpus
    expected = Counter(c4_docs[: 20 * len(files)])
    source = TextSource(files=files)
    per_reader = [_documents_read(source, rank * 2 + worker, 4) for rank in range(2) for worker in range(2)]
    assert all(per_reader), "every reader gets documents"
    assert Counter(t for texts in per_reader for t in texts) == expected


def test_workers_serve_their_readers_round_robin(t5_tokenizer, small_corpus):
    """Rank 1 with two workers yields the batches of readers 2 and 3, alternating."""
    loader = build_pretrain_loader(
        tokenizer=t5_tokenizer, files=small_corpus, batch_size=2, rank=1, world_size=2, num_workers=2
    )
    got = _take(loader, 4)
    streams = [ReaderStream(loader.source, t5_tokenizer, loader.corruption, 2, 0, r, 4, True) for r in (2, 3)]
    iters = [iter(s) for s in streams]
    for i, batch in enumerate(got):
        arrays = next(iters[i % 2])
        assert torch.equal(batch["input_ids"], torch.from_numpy(arrays["input_ids"]))
        assert torch.equal(batch["labels"], torch.from_numpy(arrays["labels"]))


def test_held_out_batches_are_the_same_every_time(t5_tokenizer, c4_valid_file):
    loader = build_pretrain_loader(
        tokenizer=t5_tokenizer, files=[c4_valid_file], split="validation", batch_size=8, num_workers=2
    )
    first, second = _take(loader, 3), _take(loader, 3)
    assert _same(first, second)


def test_hub_code_path_offline_with_a_folder_laid_out_like_c4(t5_tokenizer, tmp_path, c4_docs, c4_valid_file):
    """`dataset=<folder>` goes through the same load_dataset(name, config, split, streaming) call as
    allenai/c4: the folder has C4's file layout and a dataset card declaring the `en` config."""
    repo = tmp_path / "c4"
    (repo / "README.md").parent.mkdir()
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/c4-train.*.json.gz\n"
        "  - split: validation\n    path: en/c4-validation.*.json.gz\n---\n# C4 (local copy)\n"
    )
    _write_jsonl_gz(repo / "en" / "c4-train.00000-of-00002.json.gz", c4_docs[:40])
    _write_jsonl_gz(repo / "en" / "c4-train.00001-of-00002.json.gz", c4_docs[40:80])
    with gzip.open(c4_valid_file, "rt") as f:
        _write_jsonl_gz(repo / "en" / "c4-validation.00000-of-00001.json.gz", [json.loads(next(f))["text"] for _ in range(40)])

    train = build_pretrain_loader(tokenizer=t5_tokenizer, dataset=str(repo), dataset_config="en", batch_size=4)
    assert train.source.num_shards == 2
    batch = next(iter(train))
    assert batch["input_ids"].shape == (4, 512) and batch["labels"].shape == (4, 114)
    valid = build_pretrain_loader(
        tokenizer=t5_tokenizer, dataset=str(repo), dataset_config="en", split="validation", batch_size=4
    )
    assert valid.source.num_shards == 1 and len(_take(valid, 100)) >= 2


def test_unreachable_hub_says_how_to_use_local_files(t5_tokenizer, monkeypatch):
    import datasets
    import huggingface_hub

    # the same failure as no network, without waiting for its retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(T5ForgeError, match=r"allenai/c4.*read local files instead: data.train_files=\[.*data.validation_files="):
        build_pretrain_loader(tokenizer=t5_tokenizer, batch_size=4)


def test_tokenizer_with_too_few_sentinels_is_refused(tmp_path, c4_train_file):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(50)}}
    tiny = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    tiny.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(10))])
    tiny.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(T5ForgeError, match="needs 28 sentinels but the tokenizer has only 10"):
        build_pretrain_loader(tokenizer=tmp_path / "tokenizer.json", files=[c4_train_file], batch_size=2)


def test_changed_files_are_named_in_the_refusal(t5_tokenizer, small_corpus):
    make = lambda **kw: build_pretrain_loader(tokenizer=t5_tokenizer, files=small_corpus[:2], batch_size=2, **kw)  # noqa: E731
    loader = make()
    _take(loader, 1)
    state = loader.state_dict()
    assert [Path(f[0]).name for f in state["source"]["files"]] == ["part-0.json.gz", "part-1.json.gz"]
    small_corpus[1].write_bytes(small_corpus[1].read_bytes() + b"\0\0")
    with pytest.raises(T5ForgeError, match=r"size changed: .*part-1.json.gz \(\d+ -> \d+ bytes\).*allow_changed_files=true"):
        make().load_state_dict(state)
    other = build_pretrain_loader(tokenizer=t5_tokenizer, files=small_corpus, batch_size=2)
    with pytest.raises(T5ForgeError, match=r"shard added: .*part-2.json.gz; size changed"):
        other.load_state_dict(state)
    make(allow_changed_files=True).load_state_dict(state)  # told to continue
    unchanged = make()
    unchanged.load_state_dict(unchanged.state_dict())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_blocks_resume_exactly(t5_tokenizer, c4_train_file, num_workers, tmp_path):
    make = lambda: build_pretrain_loader(  # noqa: E731
        tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=4, seed=7, num_workers=num_workers,
        input_length=64, shuffle_buffer=10,
    )
    straight = _take(make(), 12)
    first = make()
    head = _take(first, 5)  # mid-block: 20 chunks handed out of blocks of 10 per reader
    torch.save(first.state_dict(), tmp_path / "data.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "data.pt"))
    assert _same(straight, head + _take(resumed, 7))
    unshuffled = _take(build_pretrain_loader(tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=4, seed=7,
                                             num_workers=num_workers, input_length=64), 12)
    assert not _same(straight, unshuffled)


def test_shuffle_buffer_permutes_chunks_within_blocks_and_keeps_every_chunk(t5_tokenizer, c4_train_file):
    source = TextSource(files=[c4_train_file])
    corruption = SpanCorruption(vocab_size=t5_tokenizer.vocab_size, num_sentinels=100, input_length=64)
    chunks = lambda buffer: [  # noqa: E731
        tuple(c) for c, *_ in itertools.islice(ReaderStream(source, t5_tokenizer, corruption, 4, 0, 0, 1, True,
                                                           shuffle_buffer=buffer)._blocks(), 300)]
    plain, shuffled = chunks(0), chunks(100)
    for block in range(3):
        window = slice(100 * block, 100 * (block + 1))
        assert Counter(shuffled[window]) == Counter(plain[window])  # every chunk, once
        assert shuffled[window] != plain[window]  # in another order


def test_state_is_small_and_constant_with_a_huge_document(t5_tokenizer, tmp_path, c4_docs):
    """A 4 MB document: the position is a few integers, not its read-ahead tokens."""
    huge = " ".join(c4_docs[:2000] * 3)[: 4_000_000]
    path = _write_jsonl_gz(tmp_path / "big.json.gz", [huge, *c4_docs[:20]])
    loader = build_pretrain_loader(tokenizer=t5_tokenizer, files=[path], batch_size=4, input_length=64)
    sizes = []
    for i, _ in enumerate(loader):
        if i in (1, 200, 2000):
            torch.save(loader.state_dict(), tmp_path / "data.pt")
            sizes.append((tmp_path / "data.pt").stat().st_size)
        if i == 2000:
            break
    # Growing positions take more bytes to pickle, and torch.save pads its records to 64 bytes: a step
    # of one record is that; read-ahead tokens would be thousands.
    assert max(sizes) < 4000 and max(sizes) - min(sizes) <= 128, sizes
    reader = loader.state_dict()["readers"][0]
    assert reader["record"] == 0 and reader["offset"] > 0  # still inside the huge document
    resumed = build_pretrain_loader(tokenizer=t5_tokenizer, files=[path], batch_size=4, input_length=64)
    resumed.load_state_dict(loader.state_dict())
    straight = build_pretrain_loader(tokenizer=t5_tokenizer, files=[path], batch_size=4, input_length=64)
    assert _same(_take(straight, 2004)[2001:], _take(resumed, 3))
