"""Data-parallel pre-training through torchrun (gloo, CPU): 2 ranks x 1 micro-batch take the same
optimizer steps as 1 process x 2 loader workers x grad_acc 2 -- the same readers feed each step, and
the loss is normalised over all ranks' target tokens -- so losses and weights agree to float noise."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = 4


def common(out_dir, d):
    return [
        "pretrain", "task=pt_tiny", f"out_dir={out_dir}", f"optim.total_steps={STEPS}",
        f"data.tokenizer={d / 't5-spiece' / 'spiece.model'}",
        f"data.train_files=[{d / 'c4-sample' / 'c4-en.train-00000-first1000.json.gz'}]",
        f"data.validation_files=[{d / 'c4-sample' / 'c4-en.olmo-sample-1000.json.gz'}]",
        "eval.every_steps=2", "checkpoint.every_steps=100",
    ]


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss", r.get("eval_loss"))) for r in records]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_accumulation(tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run = lambda argv: subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "t5forge", *common(ddp, data_dir), "data.num_workers=0", "optim.grad_acc=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run([sys.executable, "-m", "t5forge", *common(single, data_dir), "data.num_workers=2", "optim.grad_acc=2"])
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = losses(ddp), losses(single)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-4)
    final = f"checkpoints/step-{STEPS:08d}/model.safetensors"
    wa, wb = load_file(ddp / final), load_file(single / final)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from /proc)."""
    from pathlib import Path

    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, data_dir):
    """SIGUSR1 to rank 1 alone: the ranks agree on the step, save one checkpoint there, exit 75 each."""
    import time

    from t5forge.errors import EXIT_STOPPED

    run_dir = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "t5forge",
            *common(run_dir, data_dir), "optim.total_steps=200", "logging.every_steps=1", "data.num_workers=0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1] and proc.poll() is None
    os.kill(ranks[1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    train_steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]
    stopped = train_steps[-1]
    assert stopped < 200, err[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{stopped:08d}"]
    # Rank 0 prints the line naming rank 1's signal as "a signal to another process".
    assert (f"stopped by a signal to another process at step {stopped}; checkpoint "
            f"{run_dir / 'checkpoints' / f'step-{stopped:08d}'}; continue with resume=auto") in err
    assert f"stopped by SIGUSR1 at step {stopped}" in err
    # torchrun itself exits 1 when a worker exits non-zero; its report lists the code of the rank that
    # exited first (it then sends SIGTERM to the others, which have saved by then: the barrier above).
    assert proc.returncode != 0 and f"exitcode  : {EXIT_STOPPED} " in err, err[-3000:]
