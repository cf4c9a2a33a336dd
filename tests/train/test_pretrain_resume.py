"""Exact resume: N steps straight == N/2 steps, a new process, resume=auto, N/2 more.

Real C4 text, the real T5 vocabulary, 2 data-loader workers, gradient accumulation and dropout on
(so the RNG state must come back too). Compared bit for bit on CPU: the loss/grad-norm/lr history
in metrics.jsonl and every parameter of the final checkpoint.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = 8


def pretrain(out_dir, data_dir, *extra):
    d = data_dir
    argv = [
        sys.executable, "-m", "t5forge", "pretrain", "task=pt_tiny", f"out_dir={out_dir}",
        f"data.tokenizer={d / 't5-spiece' / 'spiece.model'}",
        f"data.train_files=[{d / 'c4-sample' / 'c4-en.train-00000-first1000.json.gz'}]",
        f"data.validation_files=[{d / 'c4-sample' / 'c4-en.olmo-sample-1000.json.gz'}]",
        "data.num_workers=2", "optim.grad_acc=2", "optim.batch_size=4", f"optim.total_steps={STEPS}",
        "model.dropout_rate=0.1", "eval.every_steps=3", "eval.steps=1", f"checkpoint.every_steps={STEPS // 2}",
        "logging.every_steps=1", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def history(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["kind"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss")) for r in records]


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, data_dir):
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(straight, data_dir)
    pretrain(split, data_dir, f"stop_at_step={STEPS // 2}")
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == [f"step-{STEPS // 2:08d}"]
    pretrain(split, data_dir, "resume=auto")

    assert history(split) == history(straight)
    assert [h[0] for h in history(straight) if h[1] == "train"] == list(range(1, STEPS + 1))
    final = f"checkpoints/step-{STEPS:08d}/model.safetensors"
    a, b = load_file(straight / final), load_file(split / final)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
