"""`t5forge pretrain` at a long input length (2048 encoder tokens, the blocked attention of the
speed twins; mean noise spans of 8 keep the sentinels within T5's 100) on real C4 text, and a micro-batch too long for this machine refused before training."""

import json
import math

from t5forge.cli import main


def test_pretraining_at_2048_input_tokens(tmp_path, c4_pretrain_args):
    out = tmp_path / "run"
    # shuffle_buffer=0: with the default buffer of 10,000 long chunks this run took 4x as long
    assert main(c4_pretrain_args(out, "data.input_length=2048", "data.mean_noise_span_length=8", "optim.batch_size=1",
                                 "data.shuffle_buffer=0", "optim.total_steps=2", "optim.warmup_steps=1",
                                 "eval.every_steps=2", "eval.steps=1", "checkpoint.every_steps=2")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)


def test_a_micro_batch_too_long_for_memory_is_refused_before_training(tmp_path, c4_pretrain_args, capsys):
    out = tmp_path / "run"
    code = main(c4_pretrain_args(out, "data.input_length=16384", "data.mean_noise_span_length=64", "model.attention=eager", "optim.total_steps=2", "optim.warmup_steps=1"))
    err = capsys.readouterr().err
    assert code == 2 and "4 x 16384 input" in err and "GiB is free" in err and "lower the micro-batch" in err
    assert not (out / "metrics.jsonl").exists()
