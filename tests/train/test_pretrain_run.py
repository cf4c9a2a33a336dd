"""`t5forge pretrain` end to end in-process on real C4 text with the real T5 vocabulary: hooks,
time budget, the saved config reproducing the run, plots, and refusing to overwrite a run."""

import json


from t5forge.cli import main
from t5forge.config_files import config_to_yaml, load_config


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_time_budget_ends_run_with_checkpoint(tmp_path, c4_pretrain_args):
    out = tmp_path / "run"
    assert main(c4_pretrain_args(out, "optim.total_steps=100000", "optim.time_budget=6s",
                         "eval.every_steps=100000", "checkpoint.every_steps=100000")) == 0
    train = [r for r in records(out) if r["kind"] == "train"]
    last = train[-1]
    assert 1 <= last["step"] < 100000
    assert last["elapsed_train_seconds"] >= 6.0
    # The cosine schedule follows the fraction of the budget spent (warmup is 2 of 100000 steps,
    # i.e. over at once): the lr only falls, and the last step, begun past half the budget, ran
    # below half of the peak lr 2e-2.
    lrs = [r["lr"] for r in train]
    assert lrs[1:] == sorted(lrs[1:], reverse=True), lrs
    assert lrs[-1] < 0.01, lrs
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step-{last['step']:08d}"]
    # The final evaluation ran although eval.every_steps was never reached.
    assert [r["step"] for r in records(out) if r["kind"] == "eval"] == [last["step"]]


def test_saved_config_reproduces_run_and_plots(tmp_path, c4_pretrain_args, capsys):
    out = tmp_path / "run"
    assert main(c4_pretrain_args(out, "optim.total_steps=4", "eval.every_steps=2", "checkpoint.every_steps=2")) == 0
    steps = [(r["kind"], r["step"]) for r in records(out)]
    assert steps == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    saved = load_config([f"config={out / 'config.yaml'}"])
    assert config_to_yaml(saved) == config_to_yaml(load_config(c4_pretrain_args(out, "optim.total_steps=4",
        "eval.every_steps=2", "checkpoint.every_steps=2")[1:]))

    assert main(["plot", str(out)]) == 0
    pngs = list((out / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)

    # Starting again in the same directory without resume is refused, naming the way out.
    capsys.readouterr()
    assert main(c4_pretrain_args(out, "optim.total_steps=4")) == 2
    err = capsys.readouterr().err
    assert "resume=auto" in err and err.count("\n") == 1
