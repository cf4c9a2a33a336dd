"""Non-finite training: steps skipped and counted, a clear stop, no NaN checkpoint, NaN models refused."""

import math

import pytest
import torch

from t5forge.errors import T5ForgeError
from t5forge.model.config import T5Config
from t5forge.model.t5 import T5
from t5forge.train.loop import train_step


def test_a_nonfinite_step_leaves_weights_and_moments_unchanged():
    torch.manual_seed(0)
    model = T5(T5Config.from_name("tiny", vocab_size=128, dropout_rate=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 100, (2, 8))
    good = [{"input_ids": ids, "labels": torch.randint(3, 100, (2, 4))}]
    train_step(model, opt, good, 1e-2, grad_clip=1.0, device=torch.device("cpu"))
    with torch.no_grad():
        model.shared.weight[5, 0] = math.inf  # a poisoned input row: the loss becomes NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    bad = [{"input_ids": torch.full((2, 8), 5), "labels": torch.randint(3, 100, (2, 4))}]
    loss, _, _, finite, _ = train_step(model, opt, bad, 1e-2, grad_clip=1.0, device=torch.device("cpu"))
    assert not bool(finite) and not math.isfinite(float(loss))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for a, s in zip(moments, opt.state.values()):
        assert torch.equal(a, s["exp_avg"])
    assert all(p.grad is None for p in model.parameters())


def test_diverged_run_stops_without_a_nonfinite_checkpoint(tmp_path, run_t5forge, tiny_pretrain_args, read_metrics):
    from t5forge.model.load import first_nonfinite, load_model
    from t5forge.train.checkpoint import list_checkpoints

    out = tmp_path / "run"
    # lr 1e30 on the constant schedule: the first update overflows the weights, and every later step is NaN.
    done = run_t5forge(*tiny_pretrain_args(out, "optim.base_lr=1e30", "optim.lr_scheduler=constant",
                                           "optim.final_cosine=0", "optim.max_nonfinite_steps=2", "optim.on_nonfinite=stop",
                                           "checkpoint.every_steps=1"))
    assert done.returncode != 0
    err = done.stderr.strip().splitlines()[-1]
    assert "NaN/inf" in err and "optim.max_nonfinite_steps" in err and "Traceback" not in done.stderr
    assert "(None)" not in err
    for ckpt in list_checkpoints(out):
        model, _ = load_model(ckpt)  # would refuse a non-finite one
        assert first_nonfinite(model) is None
    records = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert records and all("skipped_steps" in r for r in records)
    assert records[-1]["skipped_steps"] >= 1


def test_load_model_refuses_nan_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from t5forge.model.load import load_model, save_model_dir

    model = T5(T5Config.from_name("tiny", vocab_size=128))
    save_model_dir(model, None, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    name = sorted(sd)[3]
    sd[name][0] = float("nan")
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(T5ForgeError, match=f"{name}.*non-finite"):
        load_model(tmp_path)


def test_a_collapsed_model_gets_a_warning():
    from t5forge.train.nonfinite import warn_if_collapsed

    # All-zero weights (a checkpoint that collapsed): uniform predictions and zero gradients.
    model = T5(T5Config.from_name("tiny", vocab_size=128, dropout_rate=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    batch = [{"input_ids": torch.randint(3, 100, (2, 8)), "labels": torch.randint(3, 100, (2, 4))}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, n, norm, finite, _ = train_step(model, opt, batch, 1e-3, grad_clip=1.0, device=torch.device("cpu"))
    assert bool(finite)
    with pytest.warns(UserWarning, match="collapsed"):
        assert warn_if_collapsed(float(loss / n), float(norm), 128, step=1)

    # A healthy model: no warning.
    healthy = T5(T5Config.from_name("tiny", vocab_size=128, dropout_rate=0.0))
    loss, n, norm, *_ = train_step(healthy, torch.optim.AdamW(healthy.parameters()), batch, 1e-3, grad_clip=1.0,
                                  device=torch.device("cpu"))
    assert not warn_if_collapsed(float(loss / n), float(norm), 128, step=1)


def test_all_empty_targets_get_a_warning(tmp_path, spiece_path):
    import json

    from t5forge.data.seq2seq import load_seq2seq_files
    from t5forge.tokenizer import load_tokenizer

    tok = load_tokenizer(spiece_path)
    empty, fine = tmp_path / "empty.jsonl", tmp_path / "fine.jsonl"
    empty.write_text("".join(json.dumps({"input": f"question {i}", "target": ""}) + "\n" for i in range(3)))
    fine.write_text("".join(json.dumps({"input": f"question {i}", "target": "yes" if i else ""}) + "\n" for i in range(3)))
    options = dict(tokenizer=tok, max_source_length=32, max_target_length=8, name="finetune.train_files")
    with pytest.warns(UserWarning, match="every target .* is empty"):
        assert len(load_seq2seq_files([str(empty)], **options)) == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_seq2seq_files([str(fine)], **options)


@pytest.mark.parametrize("fused", [True, False])
def test_masked_step_skips_torch_adamw_on_the_device_flag(fused):
    from t5forge.train.loop import masked_step

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p], lr=1e-2, fused=fused, foreach=None if fused else True)
    p.grad = torch.randn(4, 4)
    masked_step(opt, torch.tensor(True))
    before, step = p.detach().clone(), float(opt.state[p]["step"])
    p.grad = torch.full((4, 4), float("nan"))
    masked_step(opt, torch.tensor(False))
    assert torch.equal(p, before) and float(opt.state[p]["step"]) == step and not hasattr(opt, "found_inf")
    assert torch.isfinite(opt.state[p]["exp_avg"]).all()


def test_no_checkpoint_is_written_from_nonfinite_weights(tmp_path):
    from t5forge.train.nonfinite import check_weights_finite

    model = T5(T5Config.from_name("tiny", vocab_size=128))
    check_weights_finite(model, 3, lambda: None)  # finite: nothing to say
    with torch.no_grad():
        model.shared.weight[0, 0] = float("nan")
    with pytest.raises(T5ForgeError, match=r"'shared.weight' is NaN/inf at step 3.*no checkpoint yet"):
        check_weights_finite(model, 3, lambda: None)
    with pytest.raises(T5ForgeError, match="last good checkpoint is run/checkpoints/step-00000002"):
        check_weights_finite(model, 3, lambda: "run/checkpoints/step-00000002")


# lr 1e6 after 4 warm-up steps: steps 1-3 stay finite (checkpoint at step 2), step 4 is NaN/inf.
DIVERGING = ("optim.total_steps=8", "optim.base_lr=1e6", "optim.lr_scheduler=constant", "optim.warmup_steps=4",
             "optim.max_nonfinite_steps=1", "checkpoint.every_steps=2", "eval.every_steps=100")


def test_a_diverged_run_rolls_back_with_a_lower_lr_and_finishes(tmp_path, run_t5forge, tiny_pretrain_args, read_metrics):
    from t5forge.model.load import first_nonfinite, load_model
    from t5forge.train.checkpoint import list_checkpoints
    from t5forge.train.state import TrainState

    out = tmp_path / "run"
    done = run_t5forge(*tiny_pretrain_args(out, *DIVERGING, "optim.rollback_lr_factor=1e-30", "optim.max_rollbacks=1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (f"step 4: 1 non-finite steps in a row; rolled back to checkpoint {out / 'checkpoints' / 'step-00000002'} "
            "(step 2), learning rate x1e-30 from now on (rollback 1 of 1)") in done.stdout
    last = list_checkpoints(out)[-1]
    model, _ = load_model(last)
    assert first_nonfinite(model) is None
    state = TrainState.load(last / "train_state.json")
    assert state.step == 8 and state.nonfinite_restarts == 1 and state.lr_factor == 1e-30
    records = read_metrics(out)
    (rollback,) = [r for r in records if r["kind"] == "rollback"]
    assert rollback["step"] == 4 and rollback["to_step"] == 2
    after = [r for r in records[records.index(rollback):] if r["kind"] == "train"]
    assert [r["step"] for r in after] == [3, 4, 5, 6, 7, 8] and all(r["lr"] < 1e-20 for r in after)


def test_rollbacks_exhausted_or_off_stop_with_a_clear_error(tmp_path, run_t5forge, tiny_pretrain_args):
    for extra, key in (("optim.max_rollbacks=0", "optim.max_rollbacks"), ("optim.on_nonfinite=stop", "optim.max_nonfinite_steps")):
        done = run_t5forge(*tiny_pretrain_args(tmp_path / key, *DIVERGING, extra))
        assert done.returncode != 0 and "Traceback" not in done.stderr
        err = done.stderr.strip().splitlines()[-1]
        assert "NaN/inf" in err and key in err and "step-00000002" in err


def test_a_resume_after_a_rollback_keeps_the_lower_lr(tmp_path, run_t5forge, tiny_pretrain_args, read_metrics):
    out = tmp_path / "run"
    args = (*DIVERGING, "optim.rollback_lr_factor=1e-30")
    first = run_t5forge(*tiny_pretrain_args(out, *args, "stop_at_step=6"))
    assert first.returncode == 0 and "rolled back" in first.stdout, first.stderr[-2000:]
    second = run_t5forge(*tiny_pretrain_args(out, *args, "resume=auto"))
    assert second.returncode == 0 and "rolled back" not in second.stdout, second.stderr[-2000:]
    resumed = [r for r in read_metrics(out) if r["kind"] == "train" and r["step"] > 6]
    assert [r["step"] for r in resumed] == [7, 8] and all(r["lr"] < 1e-20 for r in resumed)
