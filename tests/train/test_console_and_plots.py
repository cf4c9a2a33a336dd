"""What `t5forge pretrain` tells the user, fresh and resumed, and what `t5forge plot` draws from that
real run: in-process on real C4 text with the real T5 vocabulary and the tiny model."""

import logging
import warnings
from pathlib import Path

import pytest

import t5forge

from t5forge.cli import main
from t5forge.console import show_messages
from t5forge.plot import figures
from t5forge.train.metrics_log import read_metrics


@pytest.fixture
def run_args(c4_pretrain_args):
    def args(out_dir, *extra):
        # A warmup of 6 steps in 12, logged every 6 steps: only the warmup's own log points show its ramp.
        return c4_pretrain_args(
            out_dir, "optim.total_steps=12", "optim.warmup_steps=6", "logging.every_steps=6", "eval.every_steps=6",
            "eval.steps=1", "checkpoint.every_steps=6", *extra,
        )

    return args


def story(out: str) -> dict:
    """The console's story lines by their first word (each must appear once: no print/log doubles)."""
    lines = {}
    for line in out.splitlines():
        head = line.split(":")[0] if ":" in line[:20] else " ".join(line.split()[:2])
        assert head not in lines, f"line said twice: {line!r}\n{out}"
        lines[head] = line
    return lines


def lines_of(figure, xlabel=None):
    axes = [ax for ax in figure.axes if xlabel is None or ax.get_xlabel() == xlabel]
    return [line for ax in axes for line in ax.get_lines()]


def test_pretrain_console_fresh_and_resumed_and_plots(tmp_path, run_args, spiece_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(out, "stop_at_step=6")) == 0
    printed = capsys.readouterr()
    said = story(printed.out)
    assert said["device"].startswith("device: cpu (") and said["device"].endswith("precision fp32")
    assert said["run directory"] == f"run directory: {out}"
    assert said["tokenizer"] == f"tokenizer: {spiece_path} (data.tokenizer), 32,100 ids"
    assert said["weights"] == "weights: fresh init of the tiny architecture (seed 2137)"
    assert said["start"] == "start: fresh, at step 0 (resume=false)"
    assert said["intervals"] == "intervals: log every 6 steps, every 1 in the 6 warmup steps; eval every 6; checkpoint every 6"
    # 4 x 64 x 64 residual stream: below fused.MIN_ELEMENTS, so nothing is compiled, and the line says why
    assert said["compile"].startswith("compile: eager (model.compile=null: off for cpu); the elementwise stretches "
                                      "too: the residual stream (16,384 elements a micro-batch) is below")
    assert said["done"].startswith("done: 6 steps")
    assert "resumed from" not in printed.out
    # The metric lines go to stderr, the story does not.
    assert "step 6 eval: eval_loss=" in printed.err and "weights:" not in printed.err

    assert main(run_args(out, "resume=auto")) == 0
    printed = capsys.readouterr()
    said = story(printed.out)
    ckpt = out / "checkpoints" / "step-00000006"
    assert said["resumed from"].startswith(f"resumed from {ckpt} at step 6 (weights,")
    assert "start" not in said and said["done"].startswith("done: 12 steps")
    for head in ("device", "run directory", "tokenizer", "weights", "intervals", "compile"):
        assert head in said, head

    # Step 1, every step of the warmup, then every logging.every_steps.
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 12]

    assert main(["plot", str(out)]) == 0
    capsys.readouterr()
    built = figures(records, "run")
    assert set(built) == {"loss", "lr", "throughput", "grad_norm", "eval_metrics"}
    (lr,) = lines_of(built["lr"])
    steps, values = list(lr.get_xdata()), list(lr.get_ydata())
    assert steps == [1, 2, 3, 4, 5, 6, 12]
    # The warmup's ramp (cosine: from half the peak lr 2e-2, nanoT5's LinearLR) is in the plotted data.
    assert values[:6] == sorted(values[:6]) and values[0] == pytest.approx(0.01) and values[5] > 0.018

    # Throughput against the step and against wall-clock time, one point per train record; the
    # elapsed time goes on across the resume.
    (by_step,) = lines_of(built["throughput"], "step")
    (by_time,) = lines_of(built["throughput"], "elapsed time (s)")
    assert list(by_step.get_ydata()) == list(by_time.get_ydata()) == [r["tokens_per_s"] for r in train]
    elapsed = list(by_time.get_xdata())
    assert elapsed == sorted(elapsed) and elapsed[0] > 0 and elapsed == [r["elapsed_seconds"] for r in train]

    # The evaluation panel draws metrics only: eval_tokens (a count) and best (a flag) are left out.
    evals = [r for r in records if r["kind"] == "eval"]
    assert {"eval_tokens", "best"} <= set(evals[0])
    assert [ax.get_ylabel() for ax in built["eval_metrics"].axes] == ["eval_accuracy"]
    (eval_line,) = [line for line in lines_of(built["loss"]) if line.get_label() == "eval"]
    assert list(eval_line.get_xdata()) == [6, 12]


@pytest.fixture
def t5forge_logger():
    logger = logging.getLogger("t5forge")
    level, handlers, show = logger.level, list(logger.handlers), warnings.showwarning
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers
    warnings.showwarning = show


def test_other_ranks_say_only_warnings(t5forge_logger, capsys):
    show_messages(rank=1)
    show_messages(rank=1)  # set up twice (as by two in-process commands): still one line per message
    logging.getLogger("t5forge.train.setup").info("weights: somewhere")
    logging.getLogger("t5forge.train.checkpoint").warning("removing incomplete checkpoint x")
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == "warning: removing incomplete checkpoint x\n"
    show_messages(rank=0)
    logging.getLogger("t5forge.train.setup").info("weights: somewhere")
    assert capsys.readouterr().out == "weights: somewhere\n"


def test_t5forge_warnings_read_as_warning_lines(t5forge_logger, capsys):
    show_messages(rank=0)
    ours = str(Path(t5forge.__file__).parent / "train" / "checkpoint.py")
    warnings.showwarning("skipping damaged checkpoint x", UserWarning, ours, 113)
    err = capsys.readouterr().err
    assert err == "warning: skipping damaged checkpoint x\n"  # no file:line, no source line


def test_held_out_data_that_ends_early_is_said_once(tmp_path, run_args, data_dir, capsys):
    import gzip
    import json

    # Three real C4 documents: far fewer 64-token held-out batches of 4 than eval.steps=50 asks for.
    with gzip.open(data_dir / "c4-sample" / "c4-en.olmo-sample-1000.json.gz", "rt") as f:
        docs = [json.loads(next(f)) for _ in range(3)]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(d) + "\n" for d in docs))
    args = run_args(tmp_path / "run", "eval.steps=50", "optim.total_steps=6", "optim.warmup_steps=1",
                    "eval.every_steps=3")
    args = [a if not a.startswith("data.validation_files=") else f"data.validation_files=[{small}]" for a in args]
    assert main(args) == 0
    err = capsys.readouterr().err
    warnings_said = [line for line in err.splitlines() if "ends early" in line]
    assert len(warnings_said) == 1, err  # evaluated at steps 3 and 6, said once
    assert f"held-out data {small} ends early: each evaluation scores" in warnings_said[0]
    assert "of eval.steps=50 batches; give more data.validation_files or lower eval.steps" in warnings_said[0]
    scored = int(warnings_said[0].split("each evaluation scores ")[1].split()[0])
    assert 1 <= scored < 50
