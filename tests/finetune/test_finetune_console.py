"""What a short `t5forge finetune task=ft` tells the user and logs: nanoT5's fine-tuning preset on the real
SNI subset, from a tiny saved T5, in-process. Its step count comes from the data (2 epochs of 3 steps),
so the automatic log interval must give a train point per step, and the plots draw metrics only."""

from t5forge.cli import main
from t5forge.plot import figures
from t5forge.train.metrics_log import read_metrics


def test_short_finetune_console_points_and_eval_plot(tmp_path, tiny_model_dir, sni_dir, capsys):
    out = tmp_path / "run"
    # 20 training examples (5 per task) at the ft preset's batch 8: 3 steps per epoch, 2 epochs.
    assert main(["finetune", "task=ft", f"out_dir={out}", f"model.checkpoint_path={tiny_model_dir}",
                 f"finetune.sni_dir={sni_dir}", "finetune.max_num_instances_per_task=5", "finetune.max_seq_len=192",
                 "finetune.max_target_len=8", "eval.steps=2"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()

    def said(prefix):
        found = [line for line in lines if line.startswith(prefix)]
        assert len(found) == 1, (prefix, printed.out)  # once: no print/log doubles
        return found[0]

    assert said("device: cpu (").endswith("precision fp32")
    assert said("run directory:") == f"run directory: {out}"
    assert said("tokenizer:") == (f"tokenizer: {tiny_model_dir} (from model.checkpoint_path; data.tokenizer is not "
                                  "used), 32,100 ids")
    assert said("weights:") == f"weights: {tiny_model_dir} (model.checkpoint_path)"
    assert said("start:") == "start: fresh, at step 0 (resume=false)"
    assert said("intervals:") == "intervals: log every 1 step (auto); eval at the end only; checkpoint at the end only"
    assert said("compile:").startswith("compile: eager")
    assert said("data:").startswith("data: 2 epoch(s) of 20 training examples (3 steps per epoch)")
    assert said("done:").startswith("done: 6 steps (2 epoch(s))")
    assert not any(line.startswith(("SNI train", "weights", "tokenizer")) for line in printed.err.splitlines())

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    assert {"gen_examples", "eval_tokens", "eval_seconds", "best"} <= set(evaluation)

    built = figures(records, "run")
    train_line = next(line for line in built["loss"].axes[0].get_lines() if line.get_label() == "train (raw)")
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    # Metrics only: the counts, the evaluation's duration and the `best` flag are not drawn.
    assert [ax.get_ylabel() for ax in built["eval_metrics"].axes] == ["eval_accuracy", "exact_match", "rougeL"]
