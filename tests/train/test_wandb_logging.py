"""Weights & Biases logging (logging.wandb=true), for real in wandb's offline mode.

An offline run writes `RUN_DIR/wandb/offline-run-*/run-ID.wandb`, the record log `wandb sync`
uploads; the tests read it back with wandb's own protobuf `Record` messages, so they check what
W&B would show: the config, train and eval metrics at their steps, the summary, the exit code, and
one run id across a stop and a resume.
"""

import json
import os
import pty
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t5forge.cli import main
from t5forge.errors import RunStopped
from t5forge.train.metrics_log import MetricsLogger, read_metrics

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402 (after the importorskip)

_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 7-byte header, then 32 KiB blocks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The protobuf Records of one .wandb file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _value(item):
    if item.value_json:
        return json.loads(item.value_json)
    field = item.WhichOneof("value")
    return None if field in (None, "none") else getattr(item, field)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """What one offline-run directory holds: run id, project, name, config, history rows by step,
    the final summary and the exit code."""

    def __init__(self, directory: Path):
        (file,) = directory.glob("run-*.wandb")
        self.history, self.summary, self.config, self.exit_code = {}, {}, {}, None
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.id, self.project, self.name = record.run.run_id, record.run.project, record.run.display_name
                self.start = (record.run.start_time.seconds, record.run.start_time.nanos)
                self.config.update({_key(i): _value(i) for i in record.run.config.update})
            elif kind == "config":
                self.config.update({_key(i): _value(i) for i in record.config.update})
            elif kind == "history":
                row = {_key(i): _value(i) for i in record.history.item}
                self.history[row["_step"]] = row
            elif kind == "summary":
                self.summary.update({_key(i): _value(i) for i in record.summary.update})
            elif kind == "exit":
                self.exit_code = record.exit.exit_code


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """The run directory's offline W&B runs, oldest first (one per process)."""
    return sorted((OfflineRun(d) for d in (run_dir / "wandb").glob("offline-run-*")), key=lambda run: run.start)


def wandb_env(tmp_path, **extra) -> dict:
    """No credentials, W&B's config and caches under tmp_path (nothing from this machine's home)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
               WANDB_DATA_DIR=str(home / "data"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture
def tiny_pretrain(tiny_pretrain_args):
    return lambda out_dir, *extra: tiny_pretrain_args(
        out_dir, "logging.wandb=true", "logging.wandb_project=t5forge-tests", *extra)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb in offline mode in this process; its settings singleton is torn down afterwards, so
    the environment of later tests is read afresh."""
    for key, value in wandb_env(tmp_path, WANDB_MODE="offline", WANDB_CONSOLE="off").items():
        monkeypatch.setenv(key, value)
    wandb.teardown()
    yield
    wandb.teardown()


def test_offline_run_holds_config_and_metrics_and_a_resume_continues_it(tmp_path, data_dir, tiny_pretrain, offline_wandb,
                                                                       capfd):
    run_dir = tmp_path / "run"
    assert main(tiny_pretrain(run_dir, "stop_at_step=3")) == 0
    wandb.teardown()  # wandb's service may still be writing the run files after finish()
    assert "wandb sync" in capfd.readouterr().err  # wandb tells the user how to upload the offline run

    (run,) = offline_runs(run_dir)
    assert run.id == json.loads((run_dir / "wandb-run.json").read_text())["id"]
    assert (run.project, run.name) == ("t5forge-tests", "run")
    # The resolved config, nested as in config.yaml.
    assert run.config["optim"]["total_steps"] == 6 and run.config["logging"]["wandb"] is True
    assert run.config["data"]["tokenizer"] == str(data_dir / "t5-spiece" / "spiece.model")
    records = read_metrics(run_dir / "metrics.jsonl")
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(run.history) == [1, 2, 3]
    for step, row in run.history.items():
        assert row["train/loss"] == pytest.approx(train[step]["loss"], rel=1e-12)
        assert row["train/lr"] == pytest.approx(train[step]["lr"], rel=1e-12)
    (eval_3,) = [r for r in records if r["kind"] == "eval"]
    assert eval_3["step"] == 3 and run.history[3]["eval/eval_loss"] == pytest.approx(eval_3["eval_loss"], rel=1e-12)
    assert "eval/best" not in run.history[3]  # bookkeeping flags stay out of the charts
    assert run.exit_code == 0

    assert main(tiny_pretrain(run_dir, "resume=auto")) == 0
    wandb.teardown()
    before, after = offline_runs(run_dir)
    assert after.id == run.id  # the same W&B run, continued: `wandb sync` uploads both into it
    assert sorted(after.history) == [4, 5, 6]  # steps 1-3 are not sent twice
    records = read_metrics(run_dir / "metrics.jsonl")
    history = {**before.history, **after.history}
    assert [(r["step"], r["loss"]) for r in records if r["kind"] == "train"] == [
        (step, pytest.approx(row["train/loss"], rel=1e-12)) for step, row in sorted(history.items())]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert history[6]["eval/eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-12)
    best = min(evals, key=lambda r: r["eval_loss"])
    assert after.summary["best_eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-12)
    assert after.summary["best_eval_step"] == best["step"]


def test_a_resumed_history_sends_wandb_only_the_steps_it_lacks(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    options = {"project": "t5forge-tests", "config": {"optim": {"base_lr": 0.01}}}
    # A run stopped by a signal at step 5, whose newest checkpoint is from step 4.
    with pytest.raises(RunStopped):
        with MetricsLogger(run_dir, progress=False, wandb=options) as logger:
            for step in range(1, 6):
                logger.log_train(step, loss=10.0 - step)
                if step == 4:
                    logger.log_eval(4, eval_loss=5.0, best=True)
            raise RunStopped("stopped by SIGTERM at step 5")
    # Offline run directories are named by the second their run starts in and the run id: a resumed
    # process (seconds later in practice) would otherwise write into the first one's directory.
    time.sleep(1.0)
    with MetricsLogger(run_dir, resume_step=4, progress=False, wandb=options) as logger:
        logger.log_train(5, loss=5.5)  # W&B already has step 5 from the first process
        logger.log_train(6, loss=4.0)
        logger.log_eval(6, eval_loss=4.5, best=True)
    wandb.teardown()  # wandb's service may still be writing the run files after finish()

    first, second = offline_runs(run_dir)
    assert first.id == second.id
    assert first.exit_code == 75 and second.exit_code == 0  # stopped (relaunch), then finished
    assert sorted(first.history) == [1, 2, 3, 4, 5] and first.history[5]["train/loss"] == 5.0
    assert sorted(second.history) == [6]
    assert second.history[6] == {**second.history[6], "train/loss": 4.0, "eval/eval_loss": 4.5}
    assert (second.summary["best_eval_loss"], second.summary["best_eval_step"]) == (4.5, 6)
    # metrics.jsonl holds the resumed process's own step 5.
    assert [(r["step"], r.get("loss")) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.5), (6, 4.0)]
    # A fresh start in the same directory (no resume) is a new W&B run.
    with MetricsLogger(run_dir, progress=False, wandb=options) as logger:
        logger.log_train(1, loss=1.0)
    wandb.teardown()
    assert offline_runs(run_dir)[-1].id != first.id


def test_wandb_not_installed_is_a_clear_error_before_training(tmp_path, tiny_pretrain, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, as if not installed
    assert main(tiny_pretrain(run_dir)) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "t5forge pretrain: error: logging.wandb=true but Weights & Biases is not installed: pip install wandb, "
        "or set logging.wandb=false")
    assert not run_dir.exists()  # nothing built, nothing trained


def test_online_mode_without_an_api_key_fails_at_once_instead_of_prompting(tmp_path, tiny_pretrain):
    """On a terminal, wandb.init without credentials waits at a login prompt: t5forge says what to do."""
    run_dir = tmp_path / "run"
    master, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "t5forge", *tiny_pretrain(run_dir)],
                               stdin=terminal, stdout=terminal, stderr=terminal, env=wandb_env(tmp_path),
                               cwd=tmp_path, close_fds=True)
    os.close(terminal)
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    if process.poll() is None:
        process.kill()
        process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 2, text[-2000:]
    assert "logging.wandb=true but W&B has no API key here" in text
    assert "`wandb login`" in text and "WANDB_MODE=offline" in text and "Enter your choice" not in text
    assert not run_dir.exists()
