"""Data-parallel pre-training through torchrun (gloo, CPU): 2 ranks x 1 micro-batch take the same
optimizer steps as 1 process x 2 loader workers x grad_acc 2 -- the same readers feed each step, and
the loss is normalised over all ranks' target tokens -- so losses and weights agree to float noise."""

import json
import os
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
