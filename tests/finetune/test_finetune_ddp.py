"""Data-parallel fine-tuning through torchrun (gloo, CPU): 2 ranks x 1 micro-batch take the same optimizer
steps as 1 process x grad_acc 2 (the loader deals a step's examples to the same slots and draws the
same references), and held-out loss and generation are sharded and gathered, so the histories agree."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def args(out_dir, model_dir, sni_dir):
    return [
        "finetune", "task=ft_tiny", f"out_dir={out_dir}", f"model.checkpoint_path={model_dir}",
        f"finetune.sni_dir={sni_dir}", "finetune.max_num_instances_per_task=3", "finetune.max_seq_len=192",
        "finetune.max_target_len=8", "optim.total_steps=-1", "optim.epochs=1", "eval.every_steps=2", "eval.steps=2",
        "checkpoint.every_steps=100",
    ]


def history(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss", r.get("eval_loss")), r.get("eval_tokens"), r.get("gen_examples"))
            for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("pack", ["false", "true"])
def test_two_ranks_equal_one_process_with_accumulation(tmp_path, tiny_model_dir, sni_dir, pack):
    # pack=true: both runs train on packed rows (one per micro-batch on CPU) and evaluate packed
    # held-out batches; a rank's micro-batch is the single process's micro-step, laid out the same.
    # (Packed against padded is test_packing.py's CLI test.)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run = lambda argv: subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "t5forge", *args(ddp, tiny_model_dir, sni_dir), "optim.grad_acc=1", f"finetune.pack={pack}"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run([sys.executable, "-m", "t5forge", *args(single, tiny_model_dir, sni_dir), "optim.grad_acc=2",
                f"finetune.pack={pack}"])
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = history(ddp), history(single)
    # 12 examples, batch 4: 3 steps; evaluations at 2 and 3 over the same tokens and all 15 test examples.
    assert [x[:2] for x in a] == [x[:2] for x in b] and [x[1] for x in a if x[0] == "train"] == [1, 2, 3]
    assert [x[3:] for x in a] == [x[3:] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-4)
    wa, wb = load_file(ddp / "checkpoints/step-00000003/model.safetensors"), load_file(single / "checkpoints/step-00000003/model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    # Both ranks' examples are counted (each trained on 6 of the 12).
    for run_dir in (ddp, single):
        assert json.loads((run_dir / "checkpoints/step-00000003/train_state.json").read_text())["examples_seen"] == 12
    preds = [json.loads(l)["id"] for l in (ddp / "eval/step-00000003/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(set(preds)) == 15
