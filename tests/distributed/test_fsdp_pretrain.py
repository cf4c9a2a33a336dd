"""`t5forge pretrain distributed.strategy=fsdp` through torchrun (gloo, CPU, fp32): 2 FSDP ranks x 1
micro-batch take the same steps as 1 process x 2 loader workers x grad_acc 2 (the same readers feed
each step). Its checkpoint is a plain one: it resumes on 2 FSDP ranks, loads model and optimizer
into one process equal to the single run's, and exports to HF's format."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = 4


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss", r.get("eval_loss"))) for r in records if r["kind"] in ("train", "eval")]


@pytest.mark.slow
def test_fsdp_equals_one_process_resumes_and_exports(tmp_path, c4_pretrain_args):
    from t5forge.config import OptimConfig
    from t5forge.model.load import load_model
    from t5forge.optim.build import build_optimizer
    from t5forge.train.checkpoint import load

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    run = lambda argv: subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)  # noqa: E731
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "t5forge"]
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    common = ["precision=fp32", "eval.every_steps=2", "eval.steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
              "logging.every_steps=1"]

    done = run([*torchrun, *c4_pretrain_args(fsdp, *common, f"optim.total_steps={STEPS}", f"stop_at_step={STEPS // 2}",
                                             "distributed.strategy=fsdp", "data.num_workers=0", "optim.grad_acc=1")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2 over 2 ranks" in done.stdout + done.stderr
    # The second half: resumed on 2 FSDP ranks from the checkpoint they wrote.
    done = run([*torchrun, *c4_pretrain_args(fsdp, *common, f"optim.total_steps={STEPS}", "resume=auto",
                                             "distributed.strategy=fsdp", "data.num_workers=0", "optim.grad_acc=1")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"resumed from {fsdp / 'checkpoints' / 'step-00000002'} at step 2 (weights, optimizer, data position and "
            "RNG states)") in done.stdout + done.stderr  # the same number of ranks: every rank's own RNG states
    done = run([sys.executable, "-m", "t5forge", *c4_pretrain_args(
        single, *common, f"optim.total_steps={STEPS}", "data.num_workers=2", "optim.grad_acc=2")])
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = losses(fsdp), losses(single)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) >= STEPS
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5)
    final = fsdp / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == [final.name]  # keep_last=1
    wa, wb = load_file(final / "model.safetensors"), load_file(single / final.relative_to(fsdp) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)

    # The 2-rank checkpoint in one process: model and optimizer state equal the single run's.
    states = []
    for path, world_size in ((final, 2), (single / final.relative_to(fsdp), 1)):
        model, _ = load_model(path)
        optimizer = build_optimizer(model, OptimConfig())  # the run's parameter groups (optim.name=adamwscale)
        state, _, _ = load(path, model, optimizer, rank=0, world_size=world_size)
        assert state.step == STEPS
        states.append((model.state_dict(), optimizer.state_dict()))
    (fsdp_model, fsdp_opt), (single_model, single_opt) = states
    for key, value in single_model.items():
        torch.testing.assert_close(fsdp_model[key], value, rtol=1e-5, atol=1e-6)
    assert fsdp_opt["param_groups"] == single_opt["param_groups"]
    assert fsdp_opt["state"].keys() == single_opt["state"].keys()
    for i, moments in single_opt["state"].items():
        assert fsdp_opt["state"][i]["step"] == moments["step"]
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp_opt["state"][i][k], moments[k], rtol=1e-4, atol=1e-7)

    from transformers import T5ForConditionalGeneration

    from t5forge.cli import main

    assert main(["export", str(final), str(tmp_path / "hf")]) == 0
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(hf.shared.weight.detach(), wa["shared.weight"])
