"""`t5forge tokenizer train` on a small real corpus, and `t5forge data preview`, through the real CLI."""

import itertools

import pytest

from t5forge.cli import main
from t5forge.data.loader import build_pretrain_loader
from t5forge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def trained_vocab(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    rc = main([
        "tokenizer", "train", "--input", str(data_dir / "wikitext-2" / "valid.txt"),
        "--vocab-size", "1000", "--output", str(out), "--max-sentences", "3000",
    ])
    assert rc == 0
    return out


def test_trained_vocabulary_follows_t5_conventions(trained_vocab, capsys):
    from transformers import AutoTokenizer

    tok = load_tokenizer(trained_vocab)
    assert tok.vocab_size == 1024 and tok.vocab_size % 128 == 0  # 1000 rounded up, sentinels included
    assert tok.num_sentinels == 100 and tok.sentinel_id(0) == 1023 and tok.sentinel_id(99) == 924
    assert [tok.token_to_string(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    text = "The game began development in 2010 , carrying over a large portion of the work <extra_id_0> ."
    ids = tok.encode(text)
    assert ids[-1] == tok.eos_id and 1023 in ids
    assert tok.decode(ids) == text.replace(" <extra_id_0>", "")
    auto = AutoTokenizer.from_pretrained(str(trained_vocab))
    assert len(auto) == 1024 and auto.encode(text) == ids


def test_pretraining_examples_with_the_trained_vocabulary(trained_vocab, data_dir):
    tok = load_tokenizer(trained_vocab)
    loader = build_pretrain_loader(tokenizer=tok, files=[data_dir / "tinyshakespeare" / "input.txt"], batch_size=8)
    for batch in itertools.islice(loader, 3):
        assert batch["input_ids"].shape == (8, 512) and batch["labels"].shape == (8, 114)
        assert int(batch["input_ids"].max()) < 1024
        assert (batch["labels"][:, 0] == tok.sentinel_id(0)).all()


def test_train_rejects_a_vocabulary_too_big_for_the_corpus(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("a tiny corpus of one short line\n")
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "small.txt"), "--vocab-size", "4096",
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "too small for this vocabulary" in err and "--vocab-size" in err
    assert len(err.strip().splitlines()) == 1


def test_preview_shows_corrupted_c4_examples(c4_train_file, spiece_path, capsys):
    rc = main(["data", "preview", "--files", str(c4_train_file), "--tokenizer", str(spiece_path), "-n", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("input 512 tokens, target 114 tokens, 28 spans, noise 85/568 = 0.1496") == 2
    assert "<extra_id_0>" in out and "<extra_id_27>" in out and "Beginners BBQ" in out


def test_preview_of_a_missing_file_is_one_line(tmp_path, spiece_path, capsys):
    rc = main(["data", "preview", "--files", str(tmp_path / "none.jsonl"), "--tokenizer", str(spiece_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "none.jsonl does not exist" in err and len(err.strip().splitlines()) == 1
