"""Plan: micro-batches, span-corruption lengths, steps from epochs, time-budget progress, model config."""

import json

import pytest

from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.plan import make_plan, resolve_model_config, split_batch


def test_nanot5_default_plan():
    plan = make_plan(load_config([]))
    assert (plan.micro_batch_size, plan.grad_acc, plan.world_size) == (128, 1, 1)
    # T5's random_spans_helper for 512 inputs, density 0.15, mean span 3
    assert (plan.input_length, plan.raw_input_length, plan.target_length) == (512, 568, 114)
    assert (plan.total_steps, plan.warmup_steps, plan.time_driven) == (65536, 10000, False)
    assert plan.tokens_per_step == 128 * (512 + 114)


def test_batch_split_over_ranks_and_micro_steps():
    plan = make_plan(load_config(["task=pt_8h"]), world_size=2)
    assert plan.micro_batch_size * plan.grad_acc * plan.world_size == plan.batch_size == 256
    assert plan.micro_batch_size == 64


def test_indivisible_batch_lists_valid_grad_acc():
    with pytest.raises(T5ForgeError, match=r"optim.batch_size=128 .* optim.grad_acc \(4\) x world size \(3\)"):
        split_batch(128, 4, 3)
    with pytest.raises(T5ForgeError, match=r"grad_acc can be one of 1, 2, 4, 8, 16, 32"):
        split_batch(64, 3, 2)
    with pytest.raises(T5ForgeError, match="grad_acc"):
        make_plan(load_config(["optim.batch_size=96", "optim.grad_acc=4"]), world_size=5)


def test_epochs_need_the_data_size():
    cfg = load_config(["task=ft"])
    plan = make_plan(cfg, train_examples=101)
    assert plan.total_steps == 13 * 2  # ceil(101 / 8) steps per epoch, 2 epochs
    assert (plan.input_length, plan.target_length, plan.raw_input_length) == (1024, 128, None)
    with pytest.raises(T5ForgeError, match="optim.epochs"):
        make_plan(cfg)


def test_plan_checks_warmup_against_derived_steps():
    cfg = load_config(["task=ft", "optim.lr_scheduler=linear", "optim.warmup_steps=50"])
    with pytest.raises(T5ForgeError, match="warmup_steps=50"):
        make_plan(cfg, train_examples=80)  # 10 steps x 2 epochs


def test_step_driven_progress():
    plan = make_plan(load_config(["task=pt_tiny"]))
    assert plan.schedule_step(7, elapsed_seconds=1e9) == 7.0  # no budget: time is irrelevant
    assert not plan.should_stop(19) and plan.should_stop(20)


def test_time_budget_drives_the_schedule():
    plan = make_plan(load_config(["task=pt_tiny", "optim.time_budget=10m", "optim.total_steps=1000"]))
    assert plan.time_driven and plan.time_budget_seconds == 600
    assert plan.schedule_step(10, elapsed_seconds=300) == pytest.approx(500.0)  # half the time: half the schedule
    assert plan.schedule_step(900, elapsed_seconds=60) == pytest.approx(900.0)  # steps ahead of time
    assert plan.should_stop(10, 600) and plan.should_stop(1000, 1) and not plan.should_stop(999, 599)
    assert plan.schedule_step(10, elapsed_seconds=5000) == 1000.0  # capped at the end of the schedule
    assert "time budget" in plan.summary()


def test_resolve_model_config_builtin_with_overrides():
    mc = resolve_model_config(load_config(["task=pt_cpu"]))
    assert (mc.d_model, mc.d_kv, mc.num_heads, mc.d_ff, mc.num_layers, mc.num_decoder_layers) == (128, 32, 4, 512, 4, 4)
    assert mc.dropout_rate == 0.0 and mc.attention_backend == "sdpa" and mc.feed_forward_proj == "gated-gelu"
    base = resolve_model_config(load_config([]))
    assert (base.d_model, base.num_layers, base.d_ff, base.vocab_size) == (768, 12, 2048, 32128)


def test_resolve_model_config_errors_name_the_key():
    with pytest.raises(T5ForgeError, match="model.name='t5-gigantic'"):
        resolve_model_config(load_config(["model.name=t5-gigantic"]))
    with pytest.raises(T5ForgeError, match="model"):
        resolve_model_config(load_config(["model.feed_forward_proj=gated-swishy"]))


def test_resolve_model_config_from_hf_directory(tmp_path):
    from t5forge.model.config import T5Config

    hf = T5Config.from_name("t5-small").to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    mc = resolve_model_config(load_config([f"model.name={tmp_path}", "model.attention=eager"]))
    assert (mc.d_model, mc.d_ff, mc.feed_forward_proj, mc.tie_word_embeddings) == (512, 2048, "relu", True)
    assert mc.attention_backend == "eager" and mc.dropout_rate == 0.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(T5ForgeError, match="without config.json"):
        resolve_model_config(load_config([f"model.name={empty}"]))
