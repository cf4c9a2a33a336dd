"""Resuming pre-training on another number of processes, and a two-node torchrun launch on localhost.

Real runs (gloo on the CPU, the tiny preset on real C4): a 2-rank run (DDP, and FSDP2, whose
checkpoint is a plain full one) stopped at step 3 continues on one process with a loader worker,
re-dealing the data position and reseeding the RNG streams; two
torchrun agents started as two "nodes" of 2 processes each (c10d rendezvous on localhost) train,
checkpoint, and the run resumes on 2 nodes x 1 process. Which documents are read across such a
change is audited token by token in tests/data/test_redeal.py."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _argv(run_dir, d, *extra):
    return [
        "pretrain", "task=pt_tiny", f"out_dir={run_dir}", "optim.total_steps=6", "eval.steps=0",
        "checkpoint.every_steps=2", "data.shuffle_buffer=16", f"data.tokenizer={d / 't5-spiece' / 'spiece.model'}",
        f"data.train_files=[{d / 'c4-sample' / 'c4-en.train-00000-first1000.json.gz'}]", *extra,
    ]


def _train_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def _steps(run_dir):
    return [r["step"] for r in _train_records(run_dir)]


def _saved_world(checkpoint):
    data = torch.load(checkpoint / "data.pt", weights_only=False)
    return data["world_size"], data["ranks"][0]["layout"]["num_workers"]


def _run(argv, timeout=300):
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_stopped_then_resumed_on_one_process(tmp_path, data_dir, strategy):
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    strategy_key = f"distributed.strategy={strategy}"  # the same command line, on 2 ranks and then on 1
    err = _run([*torchrun, "-m", "t5forge", *_argv(run_dir, data_dir, "stop_at_step=3", strategy_key)])
    assert ("FSDP2 over 2 ranks" in err) == (strategy == "fsdp")
    assert _saved_world(run_dir / "checkpoints" / "step-00000003") == (2, 0)

    err = _run([sys.executable, "-m", "t5forge", *_argv(run_dir, data_dir, "resume=auto", "data.num_workers=1",
                                                         strategy_key)])
    assert ("resuming a 2-rank run (data.num_workers=0) on 1 rank(s) (data.num_workers=1): data position "
            "re-dealt from 2 to 1 readers") in err
    assert "RNG streams: the checkpoint holds those of 2 rank(s) and this run has 1; reseeded" in err
    assert (f"resumed from {run_dir / 'checkpoints' / 'step-00000003'} at step 3 (weights, optimizer, data position "
            "and RNG streams reseeded: the checkpoint's are those of 2 rank(s))") in err
    assert "RNG states" not in err
    assert "done: 6 steps" in err
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in _train_records(run_dir))
    assert _saved_world(run_dir / "checkpoints" / "step-00000006") == (1, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(nproc_per_node, argv, timeout=300):
    """Two torchrun agents on this machine, as node 0 and node 1 of a c10d rendezvous."""
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(nproc_per_node),
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "t5forge-test",
         "--node-rank", str(rank), "-m", "t5forge", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV) for rank in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            err, _ = node.communicate(timeout=timeout)
        finally:
            if node.poll() is None:
                node.kill()
        outputs.append(err)
    for node, err in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    return "".join(outputs)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over the loopback interface")
def test_two_nodes_of_two_processes_train_checkpoint_and_resume(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    err = _two_nodes(2, _argv(run_dir, data_dir, "optim.total_steps=4", "stop_at_step=2"))
    assert "done: 2 steps" in err
    assert "batch 4 = 4 rank(s) x 1 micro-step(s) x 1" in err
    assert _saved_world(run_dir / "checkpoints" / "step-00000002") == (4, 0)

    err = _two_nodes(1, _argv(run_dir, data_dir, "resume=auto", "optim.total_steps=4"))
    assert "resuming a 4-rank run (data.num_workers=0) on 2 rank(s)" in err
    assert "done: 4 steps" in err
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert _saved_world(run_dir / "checkpoints" / "step-00000004") == (2, 0)
