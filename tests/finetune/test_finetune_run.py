"""`t5forge finetune` end to end, in-process: a tiny saved T5 + the real T5 tokenizer fine-tuned on the
real SNI subset; checkpoints, metrics.jsonl, generation evaluation (Rouge-L) and exact resume."""

import json
import logging

import torch
from safetensors.torch import load_file

from t5forge.cli import main
from t5forge.data.instructions import read_sni_instances


def finetune(out_dir, model_dir, sni_dir, *extra):
    argv = [
        "finetune", "task=ft_tiny", f"out_dir={out_dir}", f"model.checkpoint_path={model_dir}",
        f"finetune.sni_dir={sni_dir}", "finetune.max_num_instances_per_task=5", "finetune.max_seq_len=192",
        *extra,
    ]
    assert main(argv) == 0


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_sni_end_to_end(tmp_path, tiny_model_dir, sni_dir, caplog):
    caplog.set_level(logging.INFO, logger="t5forge")
    out = tmp_path / "run"
    # 20 training examples, batch 4: 5 steps per epoch, 2 epochs -> 10 steps (the plan counts epochs).
    finetune(out, tiny_model_dir, sni_dir, "optim.total_steps=-1", "optim.epochs=2", "eval.every_steps=5",
             "checkpoint.every_steps=5", "eval.steps=3",
             "finetune.max_target_len=16")
    recs = records(out)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 11))
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        assert 0.0 <= r["rougeL"] <= 100.0 and 0.0 <= r["exact_match"] <= 100.0
        assert r["gen_examples"] == 25 and r["eval_loss"] > 0 and r["eval_tokens"] > 0
    # The loss over the same held-out batches went down after 10 steps at lr 1e-3.
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]

    ckpt = out / "checkpoints" / "step-00000010"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 10 and state["epoch"] == 2 and state["examples_seen"] == 40
    assert (ckpt / "spiece.model").read_bytes() == (tiny_model_dir / "spiece.model").read_bytes()

    # Predictions for every test instance, scored with the official metrics, per task too.
    eval_dir = out / "eval" / "step-00000010"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["step"] == 10 and metrics["rougeL"] == evals[1]["rougeL"]
    assert len(metrics["per_task"]) == 5
    preds = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    expected_ids = {inst["id"] for _, _, inst in read_sni_instances(sni_dir, "test", max_num_instances_per_task=5,
                                                                   seed=2137)}
    assert {p["id"] for p in preds} == expected_ids
    assert all(isinstance(p["prediction"], str) and p["references"] for p in preds)

    # The tokenizer came from the checkpoint, and the truncation counts were reported.
    messages = [r.getMessage() for r in caplog.records]
    assert any("from model.checkpoint_path" in m for m in messages)
    assert any(m.startswith("SNI train: 20 examples;") and "truncated" in m for m in messages)


def test_resume_gives_identical_history_and_weights(tmp_path, tiny_model_dir, sni_dir):
    # 12 training examples (3 per task), batch 4 in 2 micro-steps: 3 steps per epoch, 6 in all.
    common = ["finetune.max_num_instances_per_task=3", "optim.total_steps=-1", "optim.epochs=2", "optim.grad_acc=2",
              "model.dropout_rate=0.1", "eval.every_steps=2", "eval.steps=1", "checkpoint.every_steps=100",
              "finetune.max_target_len=8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    finetune(straight, tiny_model_dir, sni_dir, *common)
    # Stop mid-epoch; the schedule still spans the 6 steps and the resumed run crosses the epoch end.
    finetune(split, tiny_model_dir, sni_dir, *common, "stop_at_step=2")
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step-00000002"]
    finetune(split, tiny_model_dir, sni_dir, *common, "resume=auto")

    def history(run_dir):
        keys = ("loss", "grad_norm", "lr", "eval_loss", "rougeL", "exact_match")
        return [(r["step"], r["kind"], *(r.get(k) for k in keys)) for r in records(run_dir)]

    assert history(split) == history(straight)
    assert [h[0] for h in history(straight) if h[1] == "eval"] == [2, 4, 6]
    a = load_file(straight / "checkpoints/step-00000006/model.safetensors")
    b = load_file(split / "checkpoints/step-00000006/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for step in (2, 4, 6):
        p = f"eval/step-{step:08d}/predictions.jsonl"
        assert (split / p).read_text() == (straight / p).read_text()


def test_seq2seq_files_and_bad_input(tmp_path, tiny_model_dir, sni_dir, capsys):
    # Real SNI instances written as plain jsonl records: the generic seq2seq path.
    rows = read_sni_instances(sni_dir, "train", max_num_instances_per_task=3)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"input": i["input"], "target": i["output"]}) + "\n" for _, _, i in rows))
    out = tmp_path / "run"
    assert main(["finetune", "task=ft_tiny", f"out_dir={out}", f"model.checkpoint_path={tiny_model_dir}",
                 f"finetune.train_files=[{train_file}]", f"finetune.validation_files=[{train_file}]",
                 "optim.total_steps=3", "eval.every_steps=100", "eval.steps=1", "finetune.max_target_len=8"]) == 0
    evals = [r for r in records(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3] and evals[0]["gen_examples"] == len(rows)

    capsys.readouterr()
    cases = [
        (["task=pt_cpu"], "pre-training preset"),
        (["task=ft_tiny", f"out_dir={tmp_path / 'x'}", f"model.checkpoint_path={tiny_model_dir}"], "no fine-tuning data"),
        (["task=ft_tiny", f"out_dir={tmp_path / 'x'}", f"model.checkpoint_path={tiny_model_dir}",
          f"finetune.sni_dir={sni_dir}", f"finetune.train_files=[{train_file}]"], "both finetune.sni_dir"),
        (["task=ft_tiny", f"out_dir={out}", f"model.checkpoint_path={tiny_model_dir}",
          f"finetune.train_files=[{train_file}]"], "resume=auto"),  # the run already has checkpoints
    ]
    for argv, message in cases:
        assert main(["finetune", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_default_preset_is_ft(capsys):
    assert main(["finetune", "--print-config", "optim.base_lr=1e-3"]) == 0
    text = capsys.readouterr().out
    assert "mode: ft" in text and "epochs: 2" in text and "base_lr: 0.001" in text


def test_relaunching_a_finished_run_adds_nothing(tmp_path, tiny_model_dir, sni_dir, capsys):
    common = ["finetune.max_num_instances_per_task=3", "optim.total_steps=-1", "optim.epochs=1",
              "eval.every_steps=100", "eval.steps=1", "checkpoint.every_steps=100", "finetune.max_target_len=8"]
    run = tmp_path / "run"
    finetune(run, tiny_model_dir, sni_dir, *common)
    before = records(run)
    assert [(r["step"], r["kind"]) for r in before][-1] == (3, "eval")  # the final evaluation, after the checkpoint
    capsys.readouterr()
    finetune(run, tiny_model_dir, sni_dir, *common, "resume=auto")
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step-00000003'} at step 3" in out
    assert records(run) == before  # no second eval record for step 3
    assert f"best eval loss {before[-1]['eval_loss']:.4f} at step 3" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]
