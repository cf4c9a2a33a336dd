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
    rc = main(["data", "preview", "task=pt_tiny", "data.input_length=512", "data.shuffle_buffer=0",
               "--files", str(c4_train_file), "--tokenizer", str(spiece_path), "-n", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("input 512 tokens, target 114 tokens, 28 spans, noise 85/568 = 0.1496") == 2
    assert "<extra_id_0>" in out and "<extra_id_27>" in out and "Beginners BBQ" in out  # corpus order
    assert "train batches of 4 (the run's micro-batch), seed 2137, corpus order" in out


def test_preview_of_a_run_config_shows_the_runs_first_batches(c4_train_file, spiece_path, t5_tokenizer,
                                                               tmp_path, capsys):
    from t5forge.config_files import load_config, save_config

    config = tmp_path / "config.yaml"
    save_config(load_config(["task=pt_tiny", f"data.tokenizer={spiece_path}", f"data.train_files=[{c4_train_file}]",
                             "data.input_length=96", "data.mlm_probability=0.25", "data.mean_noise_span_length=2",
                             "data.shuffle_buffer=50", "seed=11", "optim.batch_size=6", "optim.grad_acc=2"]), config)
    assert main(["data", "preview", f"config={config}", "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert "raw chunk" in out and "-> input 96 + target" in out and "density 0.25, mean span 2.0" in out
    assert "train batches of 3 (the run's micro-batch), seed 11, shuffled in blocks of 50 chunks" in out

    # What pretraining with that config is fed: micro-batches of 3, its seed, noise and shuffling.
    loader = build_pretrain_loader(tokenizer=t5_tokenizer, files=[c4_train_file], batch_size=3, input_length=96,
                                   noise_density=0.25, mean_noise_span_length=2.0, seed=11, shuffle_buffer=50)
    expected = []
    for b, batch in enumerate(itertools.islice(loader, 2)):
        for i in range(3):
            expected += [f"=== batch {b} example {i}: input 96 tokens",
                         "--- input:\n" + t5_tokenizer.decode(batch["input_ids"][i].tolist(), skip_special_tokens=False),
                         "--- target:\n" + t5_tokenizer.decode(batch["labels"][i].tolist(), skip_special_tokens=False)]
    expected = expected[: 4 * 3]  # -n 4: the first batch and one example of the second
    positions = [out.find(text) for text in expected]
    assert -1 not in positions and positions == sorted(positions)
    assert "batch 1 example 1" not in out

    # An option overrides its key, the rest stays the run's.
    assert main(["data", "preview", f"config={config}", "-n", "1", "--seed", "12"]) == 0
    other = capsys.readouterr().out
    assert "seed 12" in other and "input 96 tokens" in other and expected[1] not in other


def test_preview_refuses_what_is_not_pretraining_data(c4_train_file, spiece_path, capsys):
    assert main(["data", "preview", "task=ft_tiny"]) == 2
    assert "mode=ft" in capsys.readouterr().err
    assert main(["data", "preview", "task=pt_tiny", f"data.train_files=[{c4_train_file}]",
                 f"data.tokenizer={spiece_path}", "--split", "validation"]) == 2
    err = capsys.readouterr().err
    assert "data.validation_files is empty" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "preview", "data.input_lenght=64"]) == 2
    assert "did you mean data.input_length" in capsys.readouterr().err


def test_preview_of_a_missing_file_is_one_line(tmp_path, spiece_path, capsys):
    rc = main(["data", "preview", "task=pt_tiny", "--files", str(tmp_path / "none.jsonl"), "--tokenizer", str(spiece_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "none.jsonl does not exist" in err and len(err.strip().splitlines()) == 1
