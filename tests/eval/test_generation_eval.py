"""Batched generation for evaluation: order, padding-invariance, truncation, decoding, metrics and files."""

import json

import pytest
import torch

from t5forge.data.instructions import load_sni
from t5forge.data.seq2seq import Seq2SeqExample
from t5forge.errors import T5ForgeError
from t5forge.eval.generation import (
    clean_up_tokenization,
    decode_prediction,
    evaluate_generation,
    generate_predictions,
)
from t5forge.eval.metrics import compute_metrics
from t5forge.model.config import T5Config
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return T5(T5Config.from_name("tiny", vocab_size=32128)).eval()


@pytest.fixture(scope="module")
def examples(data_dir, tokenizer):
    # 5 test tasks x 3 instances; prompts of 107 to 250 tokens, so batches are padded
    return load_sni(data_dir / "sni", "test", tokenizer, max_num_instances_per_task=3)


def one_by_one(model, tokenizer, source, max_source_length=1024, num_beams=1):
    """The reference: one unpadded example through model.generate, truncated as transformers does."""
    ids = tokenizer.encode(source)
    if len(ids) > max_source_length:
        ids = ids[: max_source_length - 1] + [tokenizer.eos_id]
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, num_beams=num_beams)
    return decode_prediction(tokenizer, out[0])


@pytest.mark.parametrize("batch_size,num_beams", [(4, 1), (6, 2)])
def test_batched_predictions_come_back_in_order_and_equal_one_by_one(model, tokenizer, examples, batch_size,
                                                                     num_beams):
    lengths = [len(tokenizer.encode(e.source)) for e in examples]
    assert lengths != sorted(lengths, reverse=True)  # batching by length really reorders them

    records = generate_predictions(model, tokenizer, examples, batch_size=batch_size,
                                   max_new_tokens=NEW_TOKENS, num_beams=num_beams)
    assert [r["id"] for r in records] == [e.id for e in examples]
    for r, e in zip(records, examples):
        assert (r["task"], r["categories"], r["source"], r["references"]) == (
            e.task, list(e.categories), e.source, list(e.references))
    predictions = [r["prediction"] for r in records]
    assert len(set(predictions)) > len(examples) // 2  # distinct outputs, so a mix-up could not go unseen
    assert predictions == [one_by_one(model, tokenizer, e.source, num_beams=num_beams) for e in examples]


def test_sources_are_truncated_as_transformers_does(model, tokenizer, examples):
    records = generate_predictions(model, tokenizer, examples[:4], batch_size=4, max_source_length=40,
                                   max_new_tokens=NEW_TOKENS)
    expected = [one_by_one(model, tokenizer, e.source, max_source_length=40) for e in examples[:4]]
    assert [r["prediction"] for r in records] == expected
    # and the cut matters: the full prompts give other outputs
    assert expected != [one_by_one(model, tokenizer, e.source) for e in examples[:4]]


def test_decoding_matches_transformers_cleanup_and_strips(tokenizer):
    from transformers import PreTrainedTokenizerBase

    for text in ["Hello , world . Is it ? Yes ! I do n't know , I 'm sure it 's ok .",
                 "they 've said we 're ' quoted ' here", "no change at all"]:
        assert clean_up_tokenization(text) == PreTrainedTokenizerBase.clean_up_tokenization(None, text)
    ids = tokenizer.encode(" Hello , world .  ") + [tokenizer.pad_id] * 3  # EOS then padding, as generate returns
    assert decode_prediction(tokenizer, ids) == "Hello, world."
    assert decode_prediction(tokenizer, [tokenizer.pad_id, tokenizer.eos_id]) == ""


def test_evaluate_generation_scores_with_official_metrics_and_writes_files(model, tokenizer, examples, tmp_path):
    first = generate_predictions(model, tokenizer, examples, batch_size=8, max_new_tokens=NEW_TOKENS)
    # References the model is known to hit on every other example: 50% exact match overall, and
    # per task/category counts that only come out right if predictions stay with their examples.
    hit = [i % 2 == 0 for i in range(len(examples))]
    rigged = [
        Seq2SeqExample(id=e.id, source=e.source, task=e.task, categories=e.categories,
                       references=(r["prediction"], "something else") if h else ("something else",))
        for e, r, h in zip(examples, first, hit)
    ]
    out = tmp_path / "eval"
    metrics = evaluate_generation(model, tokenizer, rigged, out, batch_size=8, max_new_tokens=NEW_TOKENS,
                                  metadata={"model": "tiny"})

    expected = compute_metrics([r["prediction"] for r in first], [e.references for e in rigged],
                               tasks=[e.task for e in rigged], categories=[e.categories[0] for e in rigged])
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["exact_match"] == pytest.approx(100.0 * sum(hit) / len(hit))
    for task, m in metrics["per_task"].items():
        assert m["exact_match"] == pytest.approx(
            100.0 * sum(h for e, h in zip(rigged, hit) if e.task == task) / m["num_examples"])
    assert len(metrics["per_category"]) == 5
    assert metrics["generation"] == {"num_beams": 1, "max_new_tokens": NEW_TOKENS, "max_source_length": 1024}

    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    written = [json.loads(line) for line in lines]
    assert [w["id"] for w in written] == [e.id for e in rigged]
    assert [w["prediction"] for w in written] == [r["prediction"] for r in first]
    assert written[0]["references"] == list(rigged[0].references)
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved == {"model": "tiny", **metrics}


def test_bad_arguments_are_user_errors(model, tokenizer, examples):
    with pytest.raises(T5ForgeError, match="no examples"):
        generate_predictions(model, tokenizer, [])
    with pytest.raises(T5ForgeError, match="batch_size must be at least 1"):
        generate_predictions(model, tokenizer, examples, batch_size=0)
    with pytest.raises(T5ForgeError, match="num_beams"):
        generate_predictions(model, tokenizer, examples, num_beams=0)
