"""`t5forge finetune` at long inputs: real C4 documents of 2,000+ tokens as prompts, cut to
finetune.max_seq_len=2048, train through the speed twins' query-block attention and are scored by
generation (the cross-attention cache over 2,048 encoder states)."""

import gzip
import json
import math

from t5forge.cli import main


def _long_pairs(data_dir, tokenizer, n, min_tokens):
    """n (input, target) pairs: consecutive C4 documents joined until the input has min_tokens tokens;
    the target is the first words of the last document."""
    pairs, text = [], []
    with gzip.open(data_dir / "c4-sample/c4-en.olmo-sample-1000.json.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["text"]
            text.append(doc)
            joined = "\n".join(text)
            if len(tokenizer.encode(joined)) >= min_tokens:
                pairs.append((joined, " ".join(doc.split()[:6])))
                text = []
                if len(pairs) == n:
                    return pairs
    raise AssertionError("the held-out C4 sample is too short for these pairs")


def test_finetuning_and_generation_at_2048_input_tokens(tmp_path, tiny_model_dir, data_dir, t5_tokenizer):
    pairs = _long_pairs(data_dir, t5_tokenizer, n=2, min_tokens=2300)
    train_file = tmp_path / "long.jsonl"
    train_file.write_text("".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in pairs))
    out = tmp_path / "run"
    assert main(["finetune", "task=ft_tiny", f"out_dir={out}", f"model.checkpoint_path={tiny_model_dir}",
                 f"finetune.train_files=[{train_file}]", f"finetune.validation_files=[{train_file}]",
                 "finetune.max_seq_len=2048", "finetune.max_target_len=8", "optim.batch_size=1",
                 "optim.total_steps=2", "eval.every_steps=2", "eval.steps=1"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    # each step's batch is one prompt cut to 2,048 encoder tokens plus its (at most 8) target tokens
    for r in train:
        assert 2048 < round(r["tokens_per_s"] * r["seconds_per_step"]) <= 2048 + 8
    assert evals and evals[-1]["gen_examples"] == 2 and math.isfinite(evals[-1]["eval_loss"])
