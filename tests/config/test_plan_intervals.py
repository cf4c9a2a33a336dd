"""The hooks' intervals in the Plan: explicit values win, null scales with the run's length (capped at
nanoT5's), step 1 and the lr warmup are logged densely, and the plan summary says what was chosen."""

import pytest

from t5forge.config_files import load_config
from t5forge.errors import T5ForgeError
from t5forge.plan import make_plan


def test_nanot5_long_runs_keep_their_intervals():
    for task in ("pt", "pt_4h", "pt_24h"):
        plan = make_plan(load_config([f"task={task}"]))
        assert (plan.log_every_steps, plan.eval_every_steps, plan.checkpoint_every_steps) == (100, 100000, 100000)
        # nanoT5's warmups (1,666 to 10,000 steps) hold 16+ points at every 100 steps: nothing denser.
        assert plan.warmup_log_every_steps == 100
        assert [s for s in range(1, 301) if plan.logs_at(s)] == [1, 100, 200, 300]
    # The real SNI fine-tune (756 tasks x 100 instances at batch 8, 2 epochs) logs as nanoT5 does.
    plan = make_plan(load_config(["task=ft"]), train_examples=75_600)
    assert (plan.total_steps, plan.log_every_steps, plan.eval_every_steps) == (18_900, 100, 100000)


def test_null_intervals_scale_with_the_run():
    assert make_plan(load_config(["task=ft"]), train_examples=100).log_every_steps == 1  # 26 steps
    assert make_plan(load_config(["task=ft"]), train_examples=4000).log_every_steps == 10  # 1,000 steps
    plan = make_plan(load_config(["task=pt_cpu"]))
    assert (plan.log_every_steps, plan.eval_every_steps, plan.checkpoint_every_steps) == (4, 40, 200)
    plan = make_plan(load_config(["task=pt_cpu", "optim.total_steps=4000", "checkpoint.every_steps=null"]))
    assert (plan.log_every_steps, plan.eval_every_steps, plan.checkpoint_every_steps) == (40, 400, 400)
    assert plan.automatic == ("logging.every_steps", "eval.every_steps", "checkpoint.every_steps")
    assert "log every 40 steps (auto), every 4 in the 40 warmup steps; eval every 400 (auto)" in plan.summary()


def test_explicit_intervals_win_and_the_warmup_is_logged():
    plan = make_plan(load_config(["task=pt_cpu", "logging.every_steps=50", "eval.every_steps=100"]))
    assert (plan.log_every_steps, plan.eval_every_steps, plan.automatic) == (50, 100, ())
    # 40 warmup steps: every 4th of them (10 points), step 1, then every 50.
    assert [s for s in range(1, 121) if plan.logs_at(s)] == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 50, 100]
    assert plan.summary().splitlines()[-1] == ("intervals: log every 50 steps, every 4 in the 40 warmup steps; "
                                              "eval every 100; checkpoint every 200")
    no_eval = make_plan(load_config(["task=pt_tiny", "eval.steps=0"]))
    assert "no evaluation (eval.steps=0)" in no_eval.intervals_summary()


def test_bad_intervals_name_the_key():
    for key in ("logging.every_steps", "eval.every_steps", "checkpoint.every_steps"):
        with pytest.raises(T5ForgeError, match=f"config key {key}=0: must be >= 1"):
            load_config([f"{key}=0"])
