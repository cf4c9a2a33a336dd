"""A fresh model's vocabulary comes from its tokenizer: an 8k vocabulary trained by `t5forge tokenizer
train` gives an 8,192-row model, model.vocab_size wins, T5's tokenizer keeps 32,128 rows, and a run
from checkpoint weights keeps the checkpoint's. Through the real CLI on real C4 text."""

import json

import pytest
from safetensors import safe_open

from t5forge.cli import main
from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.plan import make_plan, resolve_model_config
from t5forge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def vocab_8k(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab8k")
    rc = main(["tokenizer", "train", "--input", str(data_dir / "c4-sample" / "c4-en.train-00000-first1000.json.gz"),
               "--vocab-size", "8192", "--output", str(out), "--max-sentences", "1500"])
    assert rc == 0
    return out


def pretrain(out_dir, data_dir, tokenizer, *extra):
    return main([
        "pretrain", "task=pt_tiny", f"out_dir={out_dir}", f"data.tokenizer={tokenizer}",
        f"data.train_files=[{data_dir / 'c4-sample' / 'c4-en.train-00000-first1000.json.gz'}]",
        "optim.total_steps=3", "eval.steps=0", "checkpoint.every_steps=100", *extra,
    ])


def embedding_rows(checkpoint):
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in ("shared.weight", "lm_head.weight")}
    assert shapes["shared.weight"] == shapes["lm_head.weight"]
    assert json.loads((checkpoint / "model_config.json").read_text())["vocab_size"] == shapes["shared.weight"][0]
    return shapes["shared.weight"][0]


def test_trained_8k_vocabulary_sizes_the_model_and_checkpoints_keep_it(vocab_8k, data_dir, tmp_path, capsys):
    assert load_tokenizer(vocab_8k).vocab_size == 8192
    run = tmp_path / "run"
    assert pretrain(run, data_dir, vocab_8k) == 0
    out = capsys.readouterr().out
    assert "vocabulary: 8,192 rows (tokenizer: 8,192 ids, rounded up to a multiple of 128)" in out
    # tiny's 64-wide embedding and untied LM head: 2 x 8,192 x 64 of the parameters, not 2 x 32,128 x 64.
    assert "model: 1,246,208 parameters" in out
    assert embedding_rows(run / "checkpoints" / "step-00000003") == 8192

    # Continuing from those weights keeps their 8,192 rows and says where they came from.
    again = tmp_path / "continued"
    assert pretrain(again, data_dir, data_dir / "t5-spiece" / "spiece.model", f"model.checkpoint_path={run}") == 0
    out = capsys.readouterr().out
    assert "vocabulary: 8,192 rows (the starting weights'; tokenizer: 8,192 ids)" in out
    assert embedding_rows(again / "checkpoints" / "step-00000003") == 8192


def test_model_vocab_size_wins_and_must_hold_the_tokenizer(vocab_8k, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, data_dir, vocab_8k, "model.vocab_size=8320") == 0
    assert "vocabulary: 8,320 rows (model.vocab_size)" in capsys.readouterr().out
    assert embedding_rows(run / "checkpoints" / "step-00000003") == 8320

    assert pretrain(tmp_path / "small", data_dir, vocab_8k, "model.vocab_size=4096") == 2
    err = capsys.readouterr().err
    assert "model.vocab_size=4096 is smaller than the tokenizer's 8192 ids" in err and err.count("\n") == 1


def test_t5_tokenizer_keeps_t5s_32128_rows(spiece_path):
    t5_ids = load_tokenizer(spiece_path).vocab_size
    assert t5_ids == 32100
    for preset in ("pt", "pt_cpu", "ft_tiny"):
        cfg = load_config([f"task={preset}"])
        plan = make_plan(cfg, train_examples=8, tokenizer_ids=t5_ids)
        assert plan.vocab_size == 32128
        assert "vocabulary: 32,128 rows (tokenizer: 32,100 ids, rounded up to a multiple of 128)" in plan.summary()
        assert resolve_model_config(cfg, vocab_size=plan.vocab_size).vocab_size == 32128
    # Starting weights (a checkpoint, or model.name's released ones) keep their own vocabulary.
    for start in (["model.checkpoint_path=some/run"], ["task=ft"]):
        plan = make_plan(load_config(start), train_examples=8, tokenizer_ids=8192)
        assert plan.vocab_size is None and "vocabulary" not in plan.summary()
    with pytest.raises(T5ForgeError, match="model.vocab_size=32000 is smaller"):
        make_plan(load_config(["model.vocab_size=32000"]), tokenizer_ids=t5_ids)
