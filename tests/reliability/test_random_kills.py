"""`kill -9` at random moments, then resume=auto, until the run ends: the result is bit-identical.

Real processes on the real C4 sample with two loader workers, dropout and gradient accumulation
on, a checkpoint every two steps and only two kept (so kills also land in purges). Kills come at
seeded random steps plus a random fraction of a step, and one process is killed the moment a
checkpoint's `.tmp` directory appears (while it is being written). However the kills fall, the
parameters, the optimizer state and the loss history must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12
EXTRA = (
    f"optim.total_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "eval.every_steps=4",
    "data.num_workers=2", "optim.grad_acc=2", "model.dropout_rate=0.1",
)


def train_records(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [(r["step"], r["kind"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss"))
            for r in records if r["kind"] in ("train", "eval")]


def trained_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if '"kind": "train"' in line)


def kill_when(proc: subprocess.Popen, ready, deadline_s: float = 60) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False when the process ended first."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    raise AssertionError("the run neither finished nor reached the kill point in time")


def final_state(run_dir: Path) -> tuple[dict, dict]:
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)["state_dict"]
    return load_file(ckpt / "model.safetensors"), optimizer


@pytest.mark.slow
def test_random_kills_then_resume_is_bit_identical(tmp_path, run_t5forge, start_t5forge, tiny_pretrain_args):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_t5forge(*tiny_pretrain_args(straight, *EXTRA), check=0)

    rng = random.Random(7)
    kills, during_write, relaunches = 0, 0, 0
    while True:
        resume = ["resume=auto"] if relaunches else []
        proc = start_t5forge(*tiny_pretrain_args(killed, *EXTRA, *resume))
        relaunches += 1
        before = trained_steps(killed) if relaunches > 1 else 0
        if kills == 1:
            # the moment a checkpoint starts being written
            ckpts = killed / "checkpoints"
            hit = kill_when(proc, lambda: ckpts.is_dir() and any(p.suffix == ".tmp" for p in ckpts.iterdir()))
            during_write += hit
        elif kills < 5 and before < STEPS - 1:
            # a seeded random step of what is left, then a random fraction of a step
            target, delay = rng.randint(before + 1, STEPS - 1), rng.uniform(0.0, 0.1)
            reached = []

            def ready():
                if not reached and trained_steps(killed) >= target:
                    reached.append(time.monotonic())
                return bool(reached) and time.monotonic() - reached[0] >= delay

            hit = kill_when(proc, ready)
        else:
            hit = False
        if hit:
            kills += 1
            continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        break
    assert kills >= 4, f"only {kills} kills landed before the run finished"
    assert during_write == 1, "no kill landed while a checkpoint was being written"

    assert train_records(killed) == train_records(straight)
    weights_a, optim_a = final_state(straight)
    weights_b, optim_b = final_state(killed)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert optim_a["param_groups"] == optim_b["param_groups"]
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            other = optim_b["state"][index][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, key)
