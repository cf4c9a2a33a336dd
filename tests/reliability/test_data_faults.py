"""Fault injection for the pre-training data: real `t5forge pretrain` processes on real files.

- `kill -9` of a run with data-loader workers leaves no worker behind;
- a resume over changed training files is refused with the difference, or continues when told to;
- the saved data position stays small with a huge document.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest



def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")
def test_kill_9_of_the_trainer_takes_its_data_workers_with_it(tmp_path, tiny_pretrain_args, start_t5forge):
    args = tiny_pretrain_args(tmp_path / "run", "data.num_workers=2", "optim.total_steps=100000",
                              "eval.steps=0", "checkpoint.every_steps=100000")
    proc = start_t5forge(*args, stdout=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.is_file() and '"train"' in metrics.read_text()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # the two data-loader workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 2  # at once: torch's own watchdog polls the parent only every 5 s, and not at all
        # from a worker blocked writing into a full pipe
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "data-loader workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid) if proc.poll() is None else ():
            os.kill(w, signal.SIGKILL)


def test_resume_over_changed_training_files_is_refused_or_continues_when_told(
        tmp_path, data_dir, tiny_pretrain_args, run_t5forge, read_metrics):
    shards = tmp_path / "shards"
    shards.mkdir()
    c4 = data_dir / "c4-sample" / "c4-en.train-00000-first1000.json.gz"
    (shards / "part-0.json.gz").write_bytes(c4.read_bytes())
    run_dir = tmp_path / "run"
    args = lambda *extra: [  # noqa: E731
        *tiny_pretrain_args(run_dir, *extra), f"data.train_files=[{shards}/*.json.gz]"]  # the last value wins
    run_t5forge(*args("stop_at_step=3"), check=0)

    (shards / "part-1.json.gz").write_bytes(c4.read_bytes())  # the glob gains a shard
    done = run_t5forge(*args("resume=auto"))
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert len(message) == 1, done.stderr
    assert f"shard added: {shards / 'part-1.json.gz'}" in message[0] and "data.allow_changed_files=true" in message[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003"]  # nothing written

    (shards / "part-1.json.gz").unlink()
    with open(shards / "part-0.json.gz", "ab") as f:  # the same name, other bytes
        f.write(b"\0")
    done = run_t5forge(*args("resume=auto"))
    assert done.returncode == 2 and "size changed: " in done.stderr and "bytes)" in done.stderr, done.stderr

    run_t5forge(*args("resume=auto", "data.allow_changed_files=true"), check=0)
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_huge_document_keeps_data_pt_small_and_resume_exact(tmp_path, data_dir, tiny_pretrain_args, run_t5forge,
                                                              read_metrics):
    import gzip
    import json

    c4 = data_dir / "c4-sample" / "c4-en.train-00000-first1000.json.gz"
    with gzip.open(c4, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    big = tmp_path / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:  # one 3 MB document first, then ordinary ones
        f.write(json.dumps({"text": " ".join(docs * 2)[:3_000_000]}) + "\n")
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:50])
    files = f"data.train_files=[{big}]"
    run_t5forge(*tiny_pretrain_args(tmp_path / "straight", files, "data.shuffle_buffer=100"), check=0)
    split = tmp_path / "split"
    run_t5forge(*tiny_pretrain_args(split, files, "data.shuffle_buffer=100", "stop_at_step=3"), check=0)
    data_pt = split / "checkpoints" / "step-00000003" / "data.pt"
    assert data_pt.stat().st_size < 8000, data_pt.stat().st_size  # a position, not the read-ahead tokens
    run_t5forge(*tiny_pretrain_args(split, files, "data.shuffle_buffer=100", "resume=auto"), check=0)
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(split) == losses(tmp_path / "straight") and len(losses(split)) == 6
