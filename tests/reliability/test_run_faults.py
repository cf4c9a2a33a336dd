"""Fault injection on real `t5forge pretrain` processes: signals, a failing final evaluation, bad
held-out data, and run-directory mistakes. Each test checks what the user sees: the exit code, the
one-line message, what is on disk, and an exact continuation where a resume follows."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from t5forge.errors import EXIT_STOPPED



def history(records):
    return [(r["step"], r["kind"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss"))
            for r in records]


def checkpoints(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def start_and_signal(args, run_dir, sig, min_step=2, timeout=120):
    """Start `t5forge *args` in its own process group, wait until metrics.jsonl shows a train record
    at min_step or later, send `sig` to the whole group (as Ctrl-C or a scheduler does: the data
    loader workers get it too); returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "t5forge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= min_step for line in metrics.read_text().splitlines()
                                    if line.endswith("}")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before the signal\n{proc.communicate()[1][-3000:]}"
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


SIGNAL_RUN = ("optim.total_steps=40", "eval.every_steps=1000", "checkpoint.every_steps=1000", "data.num_workers=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The metrics history of the signal tests' run, uninterrupted (run once for all signals)."""

    run = tmp_path_factory.mktemp("straight")
    c4 = data_dir / "c4-sample"
    argv = ["pretrain", "task=pt_tiny", f"out_dir={run}", f"data.tokenizer={data_dir / 't5-spiece' / 'spiece.model'}",
            f"data.train_files=[{c4 / 'c4-en.train-00000-first1000.json.gz'}]",
            f"data.validation_files=[{c4 / 'c4-en.olmo-sample-1000.json.gz'}]",
            "eval.steps=1", "logging.every_steps=1", *SIGNAL_RUN]
    done = subprocess.run([sys.executable, "-m", "t5forge", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_saves_a_checkpoint_and_resume_is_exact(sig, tmp_path, tiny_pretrain_args, run_t5forge, read_metrics,
                                                       uninterrupted):
    cut = tmp_path / "cut"
    code, _, err = start_and_signal(tiny_pretrain_args(cut, *SIGNAL_RUN), cut, sig)
    assert code == EXIT_STOPPED, err[-3000:]
    steps = [r["step"] for r in read_metrics(cut) if r["kind"] == "train"]
    stopped = steps[-1]
    assert 2 <= stopped < 40 and steps == list(range(1, stopped + 1))
    line = err.strip().splitlines()[-1]
    ckpt = cut / "checkpoints" / f"step-{stopped:08d}"
    assert line == f"t5forge pretrain: stopped by {sig.name} at step {stopped}; checkpoint {ckpt}; continue with resume=auto"
    assert "Traceback" not in err
    assert checkpoints(cut) == [ckpt.name]

    done = run_t5forge(*tiny_pretrain_args(cut, *SIGNAL_RUN, "resume=auto"), check=0)
    assert f"resumed from {ckpt} at step {stopped}" in done.stdout
    assert history(read_metrics(cut)) == history(uninterrupted)


def test_second_ctrl_c_aborts_at_once(tmp_path, tiny_pretrain_args):
    from t5forge.stop_signals import StopRequests

    # In-process: the first SIGINT is recorded, the second raises (a real signal to ourselves).
    with StopRequests() as stops:
        signal.raise_signal(signal.SIGINT)
        assert stops.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_every_minutes_saves_during_the_run(tmp_path, tiny_pretrain_args, run_t5forge, read_metrics):
    run = tmp_path / "run"
    run_t5forge(*tiny_pretrain_args(run, "optim.total_steps=8", "eval.every_steps=1000",
                                    "checkpoint.every_steps=1000", "checkpoint.every_minutes=0.0001",
                                    "checkpoint.keep_last=0"), check=0)
    # every step is past 6 ms since the last save: a checkpoint at each of them, the final one included
    assert checkpoints(run) == [f"step-{s:08d}" for s in range(1, 9)]


def test_bad_validation_file_fails_at_start_up(tmp_path, tiny_pretrain_args, run_t5forge):
    tiny = tmp_path / "tiny-validation.jsonl"
    tiny.write_text(json.dumps({"text": "too short for a batch"}) + "\n")
    start = time.monotonic()
    done = run_t5forge(*tiny_pretrain_args(tmp_path / "run", f"data.validation_files=[{tiny}]",
                                           "eval.every_steps=1000"))
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("t5forge pretrain: error: ") and str(tiny) in line and "too small" in line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training
    assert time.monotonic() - start < 60


def test_final_evaluation_failure_keeps_the_weights(tmp_path, data_dir, tiny_pretrain_args, run_t5forge, read_metrics):
    # Real C4 held-out text that passes the start-up read, replaced while the run trains by a file too
    # small for one batch (a dataset swapped under a running job): the final evaluation fails.
    with gzip.open(data_dir / "c4-sample" / "c4-en.olmo-sample-1000.json.gz", "rt") as f:
        good_text = "".join(next(f) for _ in range(100))
    held_out = tmp_path / "validation.jsonl"
    held_out.write_text(good_text)
    run = tmp_path / "run"
    extra = (f"data.validation_files=[{held_out}]", "optim.total_steps=30", "eval.every_steps=1000",
             "checkpoint.every_steps=1000")
    proc = subprocess.Popen([sys.executable, "-m", "t5forge", *map(str, tiny_pretrain_args(run, *extra))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    while proc.poll() is None and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.02)
    held_out.write_text(json.dumps({"text": "too short"}) + "\n")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    final = run / "checkpoints" / "step-00000030"
    assert line.startswith("t5forge pretrain: error: the evaluation at step 30 failed: held-out data ")
    assert "too small for one batch" in line and f"saved in {final}" in line and "resume=auto" in line
    assert "Traceback" not in err
    assert checkpoints(run) == [final.name]
    assert [r["kind"] for r in read_metrics(run)] == ["train"] * 30

    # Held-out data fixed: a relaunch runs only the missing evaluation, once; a second relaunch adds nothing.
    held_out.write_text(good_text)
    again = tiny_pretrain_args(run, *extra, "resume=auto")
    run_t5forge(*again, check=0)
    records = read_metrics(run)
    assert [(r["step"], r["kind"]) for r in records] == [(s, "train") for s in range(1, 31)] + [(30, "eval")]
    assert checkpoints(run) == [final.name]
    done = run_t5forge(*again, check=0)
    assert read_metrics(run) == records
    assert f"best eval loss {records[-1]['eval_loss']:.4f} at step 30" in done.stdout


def test_cut_last_eval_record_is_rerun_on_resume(tmp_path, tiny_pretrain_args, run_t5forge, read_metrics):
    run = tmp_path / "run"
    run_t5forge(*tiny_pretrain_args(run), check=0)
    whole = read_metrics(run)
    assert (whole[-1]["step"], whole[-1]["kind"]) == (6, "eval")
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 30])  # a crash in the middle of the last line
    done = run_t5forge(*tiny_pretrain_args(run, "resume=auto"), check=0)
    assert "incomplete last line" in done.stderr
    assert history(read_metrics(run)) == history(whole)


def test_resume_auto_without_out_dir_is_refused(tmp_path, tiny_pretrain_args, run_t5forge):
    args = [a for a in tiny_pretrain_args("unused") if not a.startswith("out_dir=")] + ["resume=auto"]
    done = run_t5forge(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "t5forge pretrain: error: resume=auto needs out_dir=DIR: without it every launch makes a new timestamped "
        "run directory, so a relaunch would start from scratch instead of resuming"
    ]
    assert not (tmp_path / "runs").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path, tiny_pretrain_args, run_t5forge):
    file = tmp_path / "run"
    file.write_text("not a directory")
    done = run_t5forge(*tiny_pretrain_args(file))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"t5forge pretrain: error: out_dir={file} is a file, not a directory; give a directory for the run"
    ]
