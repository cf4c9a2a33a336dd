"""`t5forge evaluate` end to end: SNI and seq2seq-file generation metrics, held-out loss, a run's own
evaluation settings read back from its config.yaml, user errors."""

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


# ---------------------------------------------------------------------------------- a run's own settings
@pytest.fixture(scope="module")
def pt_run(tmp_path_factory, spiece_path, data_dir):
    """A real 2-step pre-training run at 128-token inputs, a 2-way gradient accumulation, a
    non-default seed and noise density, evaluated in-run on 3 held-out batches at its last step."""
    out = tmp_path_factory.mktemp("pt-run") / "run"
    assert main(["pretrain", "task=pt_tiny", f"out_dir={out}", f"data.tokenizer={spiece_path}",
                 f"data.train_files=[{data_dir / 'c4-sample' / 'c4-en.train-00000-first1000.json.gz'}]",
                 f"data.validation_files=[{data_dir / HELDOUT}]", "data.input_length=128",
                 "data.mlm_probability=0.2", "seed=7", "optim.batch_size=4", "optim.grad_acc=2",
                 "optim.total_steps=2", "optim.warmup_steps=1", "eval.every_steps=2", "eval.steps=3",
                 "checkpoint.every_steps=2"]) == 0
    return out


def final_eval(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"][-1]


def test_heldout_on_a_run_equals_the_runs_own_evaluation(pt_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "eval"
    # the mode option first, as in `t5forge evaluate --heldout RUN`: the run directory is still the model
    assert main(["evaluate", "--heldout", str(pt_run), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    in_run = final_eval(pt_run)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_tokens"] == in_run["eval_tokens"]
    assert metrics["eval_loss"] == pytest.approx(in_run["eval_loss"], rel=1e-9)
    assert metrics["eval_accuracy"] == pytest.approx(in_run["eval_accuracy"], rel=1e-9)
    assert f"settings from {pt_run / 'checkpoints' / 'step-00000002' / 'config.yaml'}" in stdout
    assert "inputs 128 tokens" in stdout and "batch size 2, seed 7, noise density 0.2" in stdout
    assert "scored 3 batches (6 examples)" in stdout
    assert f"{in_run['eval_loss']:12.4f}" in stdout
    assert metrics["data"]["batches_scored"] == 3 and metrics["data"]["input_length"] == 128

    # No mode at all: a pre-training run is evaluated the way it evaluates itself.
    assert main(["evaluate", str(pt_run)]) == 0
    assert f"{in_run['eval_loss']:12.4f}" in capsys.readouterr().out


def test_heldout_options_win_and_running_out_of_data_is_said(pt_run, data_dir, tmp_path, capsys):
    import gzip

    small = tmp_path / "three-docs.jsonl"
    with gzip.open(data_dir / HELDOUT, "rt", encoding="utf-8") as f:
        small.write_text("".join(next(f) for _ in range(3)), encoding="utf-8")
    capsys.readouterr()
    assert main(["evaluate", str(pt_run), "--heldout", str(small), "--batches", "50", "--input-length", "64"]) == 0
    stdout = capsys.readouterr().out
    scored = int(stdout.split("scored ")[1].split(" ")[0])
    assert 1 <= scored < 50
    assert f"scored {scored} of 50 batches: {small} has no more" in stdout
    assert "inputs 64 tokens" in stdout and "seed 7" in stdout  # the option wins, the rest is the run's


def test_heldout_run_files_that_moved_are_one_clear_line(pt_run, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "copy" / "checkpoints" / "step-00000002"
    shutil.copytree(pt_run / "checkpoints" / "step-00000002", ckpt)
    config = ckpt / "config.yaml"
    config.write_text(config.read_text().replace(f"{HELDOUT}", "relative/held-out.json.gz"))
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--heldout"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"data.validation_files of {config}" in err and "give --heldout FILES" in err


def test_heldout_batch_of_a_multi_process_run_is_one_ranks_micro_batch(pt_run, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ddp" / "checkpoints" / "step-00000002"
    shutil.copytree(pt_run / "checkpoints" / "step-00000002", ckpt)
    data = torch.load(ckpt / "data.pt", weights_only=True)
    # as a 2-process run writes it: batch 4 = 2 ranks x 2 micro-steps x 1
    torch.save({"world_size": 2, "ranks": data["ranks"] * 2}, ckpt / "data.pt")
    capsys.readouterr()
    assert main(["evaluate", str(ckpt)]) == 0
    stdout = capsys.readouterr().out
    assert "batch size 1, seed 7" in stdout and "scored 3 batches (3 examples)" in stdout


def test_sni_on_a_finetuning_checkpoint_uses_the_runs_prompts_and_lengths(tokenizer, model_dir, spiece_path,
                                                                         data_dir, tmp_path, capsys):
    from t5forge.config_files import load_config, save_config
    from t5forge.train.finetune import load_finetune_data

    cfg = load_config(["task=ft_tiny", f"data.tokenizer={spiece_path}", f"finetune.sni_dir={data_dir / 'sni'}",
                       "finetune.max_num_instances_per_task=2", "finetune.max_seq_len=96",
                       "finetune.max_target_len=3", "finetune.num_pos_examples=1", "finetune.add_task_name=true",
                       "seed=3", "optim.batch_size=4", "optim.grad_acc=2"])
    model, _ = load_model(model_dir)
    ckpt = save_model_dir(model, tokenizer, tmp_path / "run" / "checkpoints" / "step-00000001")
    save_config(cfg, ckpt / "config.yaml")
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "at most 3 new tokens, sources cut to 96 tokens, batch size 2" in stdout

    # The fine-tuning run's own held-out examples (its prompt format, instances and seed), decoded as it decodes.
    _, examples, _ = load_finetune_data(cfg, tokenizer)
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["source"] for r in records] == [e.source for e in examples]
    direct = generate_predictions(model, tokenizer, examples, batch_size=2, max_source_length=96, max_new_tokens=3)
    assert [r["prediction"] for r in records] == [d["prediction"] for d in direct]
