"""Checkpoint faults seen from the command line: a damaged newest checkpoint, a second writer.

(The Checkpointer's own fault cases, file by file, are in tests/train_infra/test_checkpoint_integrity.py.)
"""

from __future__ import annotations

import signal
import time

import torch
from safetensors.torch import load_file

EXTRA = ("optim.total_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "eval.every_steps=100")


def history(records):
    return [(r["step"], r["kind"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss")) for r in records]


def test_damaged_newest_checkpoint_falls_back_and_continues_bit_identically(
        tmp_path, run_t5forge, tiny_pretrain_args, read_metrics):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    run_t5forge(*tiny_pretrain_args(straight, *EXTRA), check=0)
    run_t5forge(*tiny_pretrain_args(damaged, *EXTRA, "stop_at_step=4"), check=0)
    optimizer = damaged / "checkpoints" / "step-00000004" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a cut-off write

    done = run_t5forge(*tiny_pretrain_args(damaged, *EXTRA, "resume=auto"), check=0)
    assert "skipping damaged checkpoint" in done.stderr and "optimizer.pt" in done.stderr
    assert "resumed from" in done.stdout + done.stderr and "step-00000002" in done.stdout + done.stderr
    assert history(read_metrics(damaged)) == history(read_metrics(straight))
    a = load_file(straight / "checkpoints" / "step-00000006" / "model.safetensors")
    b = load_file(damaged / "checkpoints" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_run_on_the_same_out_dir_is_refused(tmp_path, run_t5forge, start_t5forge, tiny_pretrain_args,
                                                   read_metrics):
    run_dir = tmp_path / "run"
    first = start_t5forge(*tiny_pretrain_args(run_dir, "optim.total_steps=100000", "checkpoint.every_steps=5",
                                              "eval.steps=0"))
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or '"train"' not in (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = run_t5forge(*tiny_pretrain_args(run_dir, "resume=auto"))
        assert second.returncode == 2
        assert f"{run_dir} is in use by another t5forge run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # every step once: nothing written by the second process
