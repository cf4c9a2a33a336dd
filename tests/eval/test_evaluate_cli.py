"""`t5forge evaluate` end to end: SNI and seq2seq-file generation metrics, held-out loss, user errors."""

import itertools
import json

import pytest
import torch

from t5forge.cli import main
from t5forge.data.instructions import load_sni
from t5forge.data.loader import build_pretrain_loader
from t5forge.data.seq2seq import load_seq2seq_files
from t5forge.eval.generation import generate_predictions
from t5forge.eval.loss import evaluate_loss
from t5forge.eval.metrics import compute_metrics
from t5forge.model.config import T5Config
from t5forge.model.load import load_model, save_model_dir
from t5forge.model.t5 import T5
from t5forge.tokenizer import load_tokenizer

HELDOUT = "c4-sample/c4-en.olmo-sample-1000.json.gz"


@pytest.fixture(scope="module")
def tokenizer(spiece_path):
    return load_tokenizer(spiece_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    return save_model_dir(T5(T5Config.from_name("tiny", vocab_size=32128)), tokenizer,
                          tmp_path_factory.mktemp("tiny") / "model")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sni_mode_writes_predictions_and_official_metrics(model_dir, tokenizer, data_dir, tmp_path, capsys):
    out = tmp_path / "sni-eval"
    rc = main(["evaluate", str(model_dir), "--sni", str(data_dir / "sni"), "--max-instances", "2",
               "--max-new-tokens", "5", "--batch-size", "4", "--output", str(out)])
    assert rc == 0
    examples = load_sni(data_dir / "sni", "test", tokenizer, max_num_instances_per_task=2)
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in records] == [e.id for e in examples]
    metrics = json.loads((out / "metrics.json").read_text())
    expected = compute_metrics([r["prediction"] for r in records], [r["references"] for r in records],
                               tasks=[r["task"] for r in records], categories=[r["categories"][0] for r in records])
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["num_examples"] == 10 and len(metrics["per_task"]) == 5
    assert metrics["model"] == str(model_dir) and metrics["data"]["split"] == "test"
    stdout = capsys.readouterr().out
    assert "overall" in stdout
    assert all(category in stdout for category in metrics["per_category"])


def test_files_mode_with_beam_search(model_dir, tokenizer, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "translate English to German: The house is wonderful.", "answer": "Das Haus ist wunderbar.",
             "kind": "translation"},
            {"question": "summarize: the cat sat on the mat and then it slept for a long while",
             "answer": ["cat", "a cat"], "kind": "summary"},
            {"question": "cola sentence: The course is jumping well.", "answer": "unacceptable", "kind": "cola"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["evaluate", str(model_dir), "--files", str(data), "--input-field", "question",
               "--target-field", "answer", "--task-field", "kind", "--num-beams", "2", "--max-new-tokens", "4",
               "--output", str(out)])
    assert rc == 0
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in records] == ["qa.jsonl:0", "qa.jsonl:1", "qa.jsonl:2"]
    assert records[1]["references"] == ["cat", "a cat"]

    # the CLI's wiring (fields, beams, lengths) gives what the library gives
    model, tok = load_model(model_dir)
    examples = load_seq2seq_files([data], input_field="question", target_field="answer", task_field="kind")
    direct = generate_predictions(model, tok, examples, num_beams=2, max_new_tokens=4)
    assert [r["prediction"] for r in records] == [d["prediction"] for d in direct]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_task"]) == {"translation", "summary", "cola"}
    assert "per_category" not in metrics
    assert metrics["generation"]["num_beams"] == 2


def test_heldout_mode_on_a_run_directory(model_dir, tokenizer, data_dir, tmp_path):
    # a run directory: load_model takes its newest complete checkpoint
    model, _ = load_model(model_dir)
    run = tmp_path / "run"
    save_model_dir(model, tokenizer, run / "checkpoints" / "step-00000010")
    out = tmp_path / "heldout"
    rc = main(["evaluate", str(run), "--heldout", str(data_dir / HELDOUT), "--input-length", "64",
               "--batches", "2", "--batch-size", "2", "--seed", "5", "--output", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())

    loader = build_pretrain_loader(tokenizer=tokenizer, dataset=None, files=[data_dir / HELDOUT],
                                   split="validation", batch_size=2, input_length=64, seed=5)
    expected = evaluate_loss(model, itertools.islice(iter(loader), 2), torch.device("cpu"))
    assert metrics["eval_tokens"] == expected["eval_tokens"] == 2 * 2 * loader.target_length
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert metrics["eval_accuracy"] == pytest.approx(expected["eval_accuracy"])
    assert metrics["data"]["target_length"] == loader.target_length and metrics["mode"] == "heldout"


def test_tokenizer_option_for_a_model_saved_without_one(model_dir, spiece_path, data_dir, tmp_path, capsys):
    model, _ = load_model(model_dir)
    bare = save_model_dir(model, None, tmp_path / "bare")
    args = ["evaluate", str(bare), "--heldout", str(data_dir / HELDOUT), "--input-length", "32", "--batches", "1",
            "--batch-size", "1"]
    assert main(args) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(args + ["--tokenizer", str(spiece_path)]) == 0
    assert "eval_loss" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    ([], "nothing to evaluate"),
    (["--sni", "{data}/sni", "--heldout", "{data}/" + HELDOUT], "choose one of --sni, --files, --heldout"),
    (["--sni", "{tmp}/no-such-sni"], "no-such-sni does not exist"),
    (["--files", "{tmp}/missing.jsonl"], "missing.jsonl does not exist"),
    (["--heldout", "{tmp}/missing.json.gz"], "missing.json.gz does not exist"),
    (["--sni", "{data}/sni", "--num-beams", "0"], "--num-beams must be at least 1"),
    (["--sni", "{data}/sni", "--device", "tpu9"], "--device 'tpu9'"),
    (["--sni", "{data}/sni", "--output", "{tmp}/a-file"], "is a file"),
])
def test_user_errors_are_one_line(model_dir, data_dir, tmp_path, capsys, extra, message):
    (tmp_path / "a-file").write_text("x")
    args = [a.format(data=data_dir, tmp=tmp_path) for a in extra]
    assert main(["evaluate", str(model_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t5forge evaluate: error:") and "\n" not in err
    assert message in err


def test_missing_model_path_is_one_line(data_dir, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "no-model"), "--sni", str(data_dir / "sni")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-model does not exist" in err and "\n" not in err
